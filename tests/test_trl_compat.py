"""`trl dpo` drop-in: HfArgumentParser spellings, every TRL option accepted or refused, TRL's documented command
lines and a TRL-style YAML running unchanged on a local tiny model and local data."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from prefkit.cli import main, parse_config
from prefkit.config import option_names
from prefkit.data import PairCollator
from prefkit.errors import ConfigError
from prefkit.logprobs import compute_pair_logps
from prefkit.objectives import ObjectiveSpec, build_objective
from prefkit.trl_compat import ALIASES, REFUSED, TRANSLATED, accepted, normalize_argv, refusals_table_markdown
from tests.conftest import WORDS


def _cfg(*argv: str):
    return parse_config(["--output_dir", "/tmp/prefkit-unused", *argv])


def test_hf_argparser_spellings():
    cfg = _cfg("--no_remove_unused_columns", "--gradient-checkpointing", "--learning_rate=5e-7", "--use_peft",
               "--no-pack-pairs", "--lora-r=32", "--bf16=false")
    assert cfg.remove_unused_columns is False and cfg.activation_checkpointing is True
    assert cfg.learning_rate == 5e-7 and cfg.use_peft is True and cfg.pack_pairs is False and cfg.lora_r == 32
    assert cfg.bf16 is False
    # a bare flag in the middle and at the end; --no_<flag> of a flag that defaults to false
    cfg = _cfg("--use_peft", "--beta", "0.2", "--no_use_peft", "--poet")
    assert cfg.use_peft is False and cfg.poet is True and cfg.beta == 0.2
    assert normalize_argv(["--remove-unused-columns=false"]) == ["--remove_unused_columns", "false"]


def test_trl_names_and_translations():
    cfg = _cfg("--model_dtype", "float32", "--dataset_train_split", "tr", "--dataset_test_split", "dev",
               "--warmup_ratio", "0.1", "--padding_free", "false", "--attn_implementation", "eager",
               "--model_revision", "v1", "--dataset_config", "cfg", "--use_rslora", "--use_dora",
               "--lora_modules_to_save", "lm_head", "embed_tokens", "--lora_task_type", "CAUSAL_LM")
    assert cfg.dtype == "float32" and cfg.dataset_split == "tr" and cfg.eval_split == "dev"
    assert cfg.warmup_steps == pytest.approx(0.1)  # transformers 5: a value below 1 is a ratio
    assert cfg.pack_pairs is False and cfg.attn_implementation == "eager" and cfg.model_revision == "v1"
    assert cfg.dataset_config == "cfg" and cfg.use_rslora and cfg.use_dora
    assert cfg.lora_modules_to_save == ["lm_head", "embed_tokens"]
    assert _cfg("--dtype", "bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("argv, match", [
    (["--use_liger_kernel"], "--use_liger_kernel true: not supported by prefkit; prefkit always applies the LM head"),
    (["--dataset_streaming"], "--max_train_samples"),
    (["--streaming", "true"], "--dataset_streaming true: not supported"),
    (["--model_init_kwargs", '{"a": 1}'], "--dtype, --attn_implementation"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio: must be a number in [0, 1), got 1.5"),
    (["--learning_rate", "nan"], "--learning_rate: must be a finite number, got nan"),
    (["--beta=inf"], "--beta: must be a finite number, got inf"),
    (["--max_grad_norm", "-inf"], "--max_grad_norm: must be a finite number"),
    (["--beta", "abc"], "argument --beta: invalid float value: 'abc'"),
    (["--no_use_peft", "yes"], "--no_use_peft takes no value"),
])
def test_refusals_and_bad_values_are_one_line(argv, match):
    with pytest.raises(ConfigError, match=None) as e:
        _cfg(*argv)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_refused_option_at_its_off_value_is_a_no_op():
    cfg = _cfg("--use_liger_kernel", "false", "--dataset_streaming", "false", "--dataset_num_proc", "None")
    assert not cfg.use_liger_kernel


def test_every_trl_field_is_accepted_or_refused_with_a_documented_reason():
    trl_compat = pytest.importorskip("prefkit.trl_compat")
    pytest.importorskip("trl")
    docs = (Path(__file__).parents[1] / "docs" / "trl.md").read_text()
    assert refusals_table_markdown() in docs  # the docs table is the generated one
    fields = trl_compat.trl_fields()
    assert sum(len(v) for v in fields.values()) > 150  # TrainingArguments' fields too: the walk is not empty
    missing = [f"{cls}.{name}" for cls, names in fields.items() for name in names
               if not accepted(name) and name not in REFUSED]
    assert not missing, f"TRL options neither accepted nor refused: {missing}"
    for name, refusal in REFUSED.items():
        assert refusal.reason and "\n" not in refusal.reason and f"`{name}`" in docs
    known = set(option_names())
    assert all(v in known for v in ALIASES.values() if v != "dataset_streaming")
    assert all(v in known for v in TRANSLATED.values())


def _pairs(n: int, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(" ".join(rng.choices(WORDS, k=rng.randint(3, 8))))
        rows["chosen"].append(" ".join(rng.choices(WORDS[:9], k=rng.randint(2, 8))))
        rows["rejected"].append(" ".join(rng.choices(WORDS[9:], k=rng.randint(2, 8))))
    return rows


@pytest.fixture
def hub_like_dataset(tmp_path: Path) -> Path:
    """A local stand-in for trl-lib/ultrafeedback_binarized: a saved DatasetDict with train and test splits."""
    path = tmp_path / "ultrafeedback_binarized"
    DatasetDict({"train": Dataset.from_dict(_pairs(16)), "test": Dataset.from_dict(_pairs(4, seed=1))}).save_to_disk(
        str(path))
    return path


def _trl_example(model_dir: Path, data: Path, out: Path) -> list[str]:
    # TRL's documented `trl dpo` command (trl/scripts/dpo.py docstring), model/data local, steps cut
    return ["train", "--dataset_name", str(data), "--model_name_or_path", str(model_dir), "--learning_rate",
            "5.0e-7", "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--eval_strategy", "steps",
            "--eval_steps", "1", "--output_dir", str(out), "--no_remove_unused_columns"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_trl_documented_command_lines_run_unchanged(tmp_path, model_dir, hub_like_dataset, lora):
    out = tmp_path / "Qwen2-0.5B-DPO"
    extra = ["--use_peft", "--lora_r", "32", "--lora_alpha", "16"] if lora else []
    assert main(_trl_example(model_dir, hub_like_dataset, out) + extra) == 0
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records) and any("train_loss" in r for r in records)
    assert (out / ("adapter_config.json" if lora else "config.json")).is_file()


@pytest.mark.slow
def test_trl_style_yaml_and_model_config_flags(tmp_path, model_dir, hub_like_dataset):
    yaml_file = tmp_path / "dpo.yaml"
    yaml_file.write_text(
        f"model_name_or_path: {model_dir}\ndataset_name: {hub_like_dataset}\ndataset_train_split: train\n"
        f"dataset_test_split: test\noutput_dir: {tmp_path / 'out'}\nlearning_rate: 5.0e-7\nwarmup_ratio: 0.1\n"
        "lr_scheduler_type: cosine\nper_device_train_batch_size: 2\nmax_steps: 2\nlogging_steps: 1\n"
        "gradient_checkpointing: true\ngradient_checkpointing_kwargs:\n  use_reentrant: false\n"
        "eval_strategy: 'no'\nremove_unused_columns: false\nuse_liger_kernel: false\nbeta: 0.1\nloss_type: [sigmoid]\n"
        "dtype: float32\nattn_implementation: eager\nmodel_revision: main\nuse_peft: true\nlora_r: 8\n"
        "lora_alpha: 16\nlora_task_type: CAUSAL_LM\nuse_rslora: true\nlora_target_modules: [q_proj, v_proj]\n"
        "report_to: none\nenv:\n  WANDB_PROJECT: prefkit-test\n"
    )
    assert main(["train", "--config", str(yaml_file)]) == 0
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["r"] == 8
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    card = (tmp_path / "out" / "README.md").read_text()  # prefkit's card, not peft's placeholder
    assert "[More Information Needed]" not in card and "library_name: peft" in card and "- prefkit" in card
    assert "loss_type: sigmoid" in card and "@inproceedings{rafailov2023direct" in card
    assert "AutoPeftModelForCausalLM" in card and "transformers:" in card


def test_eval_strategy_without_eval_set_says_how_to_get_one(tmp_path, model_dir, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), r))) + "\n"
                            for r in zip(*_pairs(8).values())))
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--max_steps", "1",
            "--eval_strategy", "steps", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--eval_split_size" in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("prefkit: error: --eval_strategy steps: needs held-out pairs")


@pytest.mark.slow
def test_eval_strategy_with_eval_split_size_splits_one_off(tmp_path, model_dir):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), r))) + "\n"
                            for r in zip(*_pairs(12).values())))
    out = tmp_path / "o"
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--max_steps", "2",
            "--eval_strategy", "steps", "--eval_steps", "1", "--eval_split_size", "4", "--output_dir", str(out),
            "--per_device_train_batch_size", "2"]
    assert main(argv) == 0
    assert any("eval_loss" in json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines())


def test_load_in_4bit_is_refused_where_bitsandbytes_cannot_run(tmp_path, model_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run bitsandbytes")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--use_peft",
            "--load_in_4bit", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--load_in_4bit" in err and ("pip install bitsandbytes" in err or "CUDA" in err)


def _packed_batch(tok, n: int = 3):
    from prefkit.accel.attention import register_segment_attention

    register_segment_attention()  # packed pairs are read by the segment attention, which the host layer registers
    rows = _pairs(n, seed=3)
    feats = []
    for i, (p, c, r) in enumerate(zip(rows["prompt"], rows["chosen"], rows["rejected"])):
        feats.append({"prompt_ids": tok(p)["input_ids"], "chosen_ids": tok(c, add_special_tokens=False)["input_ids"],
                      "rejected_ids": tok(r, add_special_tokens=False)["input_ids"], "row_id": i})
    return PairCollator(pad_token_id=tok.pad_token_id, share_prompt=True, pack_pairs=True)(feats)


def _loss_and_grads(model, batch, ref):
    model.zero_grad(set_to_none=True)
    lp = compute_pair_logps(model, batch)
    with torch.no_grad():
        rl = compute_pair_logps(ref, batch)
    out = build_objective(ObjectiveSpec())(lp.replace(ref_chosen=rl.chosen, ref_rejected=rl.rejected))
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.slow
def test_gradient_checkpointing_same_values_and_gradients(tiny_llama, tiny_tokenizer, lora):
    batch = _packed_batch(tiny_tokenizer)
    ref = copy.deepcopy(tiny_llama).eval()
    with torch.no_grad():
        for p in tiny_llama.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = tiny_llama
    if lora:
        from prefkit.models import apply_lora

        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    model.train()
    loss0, grads0 = _loss_and_grads(model, batch, ref)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    loss1, grads1 = _loss_and_grads(model, batch, ref)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    if lora:
        assert all("lora_" in n for n in grads0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--loss_type", "sft"], ["--loss_type", "sigmoid_norm"], ["--loss_type", "aot_unpaired"],
    ["--loss_type", "sigmoid", "--ld_alpha", "0.5", "--f_divergence_type", "js_divergence", "--use_weighting",
     "--sync_ref_model", "--ref_model_sync_steps", "1", "--rpo_alpha", "0.5"],
])
def test_trl_116_losses_and_options_train(tmp_path, model_dir, extra):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), r))) + "\n"
                            for r in zip(*_pairs(8).values())))
    out = tmp_path / "o"
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--output_dir", str(out), *extra]
    assert main(argv) == 0
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_card_names_the_embedded_default_by_hub_id(tmp_path):
    from prefkit.card import DEFAULT_MODEL_ID, base_model_id

    assert base_model_id(None) == DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("/cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf") == DEFAULT_MODEL_ID
    assert base_model_id("Qwen/Qwen2-0.5B-Instruct") == "Qwen/Qwen2-0.5B-Instruct"
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2-0.5B-Instruct"}))
    assert base_model_id(str(local)) == "Qwen/Qwen2-0.5B-Instruct"
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert base_model_id(str(local)) is None  # a local path is never written as base_model


def test_known_noise_is_filtered_and_real_warnings_kept():
    import logging
    import warnings

    from prefkit.quiet import quiet_known_noise

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    ds = logging.getLogger("DeepSpeed")
    handler = Keep()
    ds.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_noise()
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use x", FutureWarning, stacklevel=1)
            warnings.warn("`use_cache=True` is incompatible with something", FutureWarning, stacklevel=1)
            warnings.warn("a real user warning", UserWarning, stacklevel=1)
            ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
            ds.warning("DeepSpeed found a real problem")
    finally:
        ds.removeHandler(handler)
        for f in list(ds.filters):
            ds.removeFilter(f)
    assert [str(w.message) for w in caught] == ["`use_cache=True` is incompatible with something", "a real user warning"]
    assert seen == ["DeepSpeed found a real problem"]


def test_jsonl_with_a_utf8_byte_order_mark(tmp_path):
    from prefkit.data import load_rows

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e", '
                     b'"rejected": "f"}\n')
    rows = load_rows(str(path))
    assert rows["prompt"] == ["a", "d"] and rows["__row__"] == [1, 2]
