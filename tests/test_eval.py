"""`prefkit eval` of a saved run: explicit options win over the saved ones, the reference comes only from the
user's options (a saved one is named, not loaded), and every model is loaded under one dtype rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import prefkit.run
import prefkit.runsetup
from prefkit.cli import main
from tests.conftest import _small
from tests.test_train_e2e import write_pairs


@pytest.fixture
def saved_run(tmp_path: Path, model_dir: Path, tiny_tokenizer) -> tuple[Path, Path]:
    """A full-model run dir trained from model_dir with --ref_model_name_or_path R and --beta 0.5 (weights
    perturbed so the implicit rewards are not 0); returns (run dir, R)."""
    torch.manual_seed(1)
    ref = tmp_path / "sft"
    LlamaForCausalLM(LlamaConfig(**_small(len(tiny_tokenizer)))).save_pretrained(ref)
    tiny_tokenizer.save_pretrained(ref)
    run = tmp_path / "run"
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(run)
    tiny_tokenizer.save_pretrained(run)
    saved = {"beta": 0.5, "model_name_or_path": str(model_dir), "ref_model_name_or_path": str(ref)}
    (run / prefkit.runsetup.CONFIG_FILE).write_text(yaml.safe_dump(saved))
    return run, ref


def _eval(run: Path, data: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--model_name_or_path", str(run), "--dataset_name", str(data), "--max_length", "64",
                 "--output_file", str(run.parent / "e.json"), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_explicit_beta_wins_over_the_saved_one(tmp_path, saved_run, capsys):
    run, ref = saved_run
    data = write_pairs(tmp_path / "p.jsonl", 6)
    saved = _eval(run, data, capsys, "--ref_model_name_or_path", str(ref))
    explicit = _eval(run, data, capsys, "--beta", "0.1", "--ref_model_name_or_path", str(ref))  # 0.1 is also the default: given is what counts
    assert saved["reward_margin"] != 0
    assert explicit["reward_margin"] == pytest.approx(saved["reward_margin"] * 0.1 / 0.5, rel=1e-5)


def test_eval_names_the_saved_reference_instead_of_loading_it(tmp_path, saved_run, capsys, monkeypatch):
    run, ref = saved_run
    loaded: list[str] = []
    monkeypatch.setattr(prefkit.run, "load_causal_lm", lambda path, **kw: loaded.append(str(path)))
    code = main(["eval", "--model_name_or_path", str(run), "--dataset_name", str(write_pairs(tmp_path / "p.jsonl", 4)),
                 "--max_length", "64", "--trust_remote_code", "true"])
    err = capsys.readouterr().err
    assert code != 0 and f"pass --ref_model_name_or_path {ref}" in err and "Traceback" not in err
    assert str(ref) not in loaded  # never loaded with the user's trust_remote_code on a saved file's word


def test_eval_without_a_reference(tmp_path, saved_run, capsys):
    run, _ = saved_run
    result = _eval(run, write_pairs(tmp_path / "p.jsonl", 4), capsys, "--ref_model_name_or_path", "none")
    assert result["ranking_accuracy"] is not None and result.get("reward_margin") is None


def test_eval_of_a_full_model_uses_the_given_reference_model(tmp_path, saved_run, capsys, monkeypatch):
    run, ref = saved_run
    loaded: list[str] = []
    real = prefkit.run.load_causal_lm

    def recording(path, **kw):
        loaded.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(prefkit.run, "load_causal_lm", recording)
    _eval(run, write_pairs(tmp_path / "p.jsonl", 4), capsys, "--ref_model_name_or_path", str(ref))
    assert loaded == [str(run), str(ref)]


def test_one_dtype_rule_for_every_model_loaded(tmp_path, model_dir, monkeypatch):
    """--use_cpu on a host whose GPU has fast bf16 but whose CPU has not: frozen models load in fp32 (the rule
    of the device they run on), not in the GPU's bf16."""
    import prefkit.accel.precision
    from prefkit.config import PrefConfig

    cfg = PrefConfig(output_dir=str(tmp_path / "o"), use_cpu=True, model_name_or_path=str(model_dir))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(prefkit.accel.precision, "bf16_is_fast", lambda device_type: device_type == "cuda")
    dtypes: list[torch.dtype] = []
    real = prefkit.run.load_causal_lm

    def recording(path, *, dtype, **kw):
        dtypes.append(dtype)
        return real(path, dtype=dtype, **kw)

    monkeypatch.setattr(prefkit.run, "load_causal_lm", recording)
    model, _, _ = prefkit.run.load_for_eval(cfg)
    assert dtypes == [torch.float32] and model.dtype == torch.float32


def _first_linear_dtypes(model: torch.nn.Module, seen: list) -> torch.utils.hooks.RemovableHandle:
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))


def test_pair_logp_sums_runs_under_the_given_autocast(tiny_llama, tiny_tokenizer):
    """Held-out scoring under a run's --bf16 autocast: the model's linear layers compute in bf16 there, and in
    fp32 without it (checked on an intermediate through a forward hook)."""
    from datasets import Dataset

    from prefkit.data import PairCollator
    from prefkit.evaluate import batches_of, pair_logp_sums

    ds = Dataset.from_list([{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2], "row_id": 0}] * 3)
    collator = PairCollator(pad_token_id=0)
    for autocast, want in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        seen: list = []
        handle = _first_linear_dtypes(tiny_llama, seen)
        try:
            scores = pair_logp_sums(tiny_llama, batches_of(ds, collator, 2), autocast=autocast)
        finally:
            handle.remove()
        assert seen and set(seen) == {want} and scores.chosen_sum.shape == (3,)


def test_eval_scores_under_the_runs_autocast(tmp_path, saved_run, capsys, monkeypatch):
    """`prefkit eval --bf16 true` scores the policy and the reference under bf16 autocast."""
    run, ref = saved_run
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    real, seen = prefkit.run.pair_logp_sums, []

    def spying(model, *a, **kw):
        handle = _first_linear_dtypes(model, seen)
        try:
            return real(model, *a, **kw)
        finally:
            handle.remove()

    monkeypatch.setattr(prefkit.run, "pair_logp_sums", spying)
    _eval(run, data, capsys, "--bf16", "true", "--use_cpu", "true", "--ref_model_name_or_path", str(ref))
    assert len(seen) >= 2 and set(seen) == {torch.bfloat16}


def test_the_trainer_scores_held_out_pairs_as_prefkit_eval_does_without_training_only_eos_padding(
        tiny_llama, tiny_tokenizer, tmp_path):
    """Before/after metrics come from the trainer through the one scoring function `prefkit eval` uses: the same
    sums as a plain pass, in the run's layout, and with --static_padding eos the shorter response is not extended
    with the EOS tokens the training batches score (each response counts its own tokens)."""
    from datasets import Dataset

    from prefkit.config import PrefConfig
    from prefkit.data import PairCollator
    from prefkit.evaluate import batches_of, pair_logp_sums
    from prefkit.trainer import PrefTrainer

    rows = [{"prompt": "a b", "chosen": " c d e f", "rejected": " g"}, {"prompt": "c", "chosen": " a", "rejected": " b c"}]
    args = PrefConfig(output_dir=str(tmp_path), per_device_eval_batch_size=1, use_cpu=True, report_to="none",
                      granularity="static", window_size=2, static_padding="eos")
    trainer = PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer)
    assert trainer.data_collator.static_eos_padding  # training batches are padded with EOS
    ds = trainer.train_dataset
    got = trainer.held_out_logp_sums(ds)
    lengths = [(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in ds]
    assert got.chosen_len.tolist() == [c for c, _ in lengths] and got.rejected_len.tolist() == [r for _, r in lengths]
    plain = pair_logp_sums(tiny_llama, batches_of(ds, PairCollator(pad_token_id=tiny_tokenizer.pad_token_id), 2))
    torch.testing.assert_close(got.chosen_sum, plain.chosen_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.rejected_sum, plain.rejected_sum, rtol=1e-6, atol=1e-6)
