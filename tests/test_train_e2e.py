"""End to end through the CLI: train a few steps → save → reload → eval → resume gives the same losses."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefkit.cli import main

WORDS = "the a cat dog sat ran on under mat log red blue big small quickly slowly home park".split()


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
            chosen = " ".join(rng.choices(WORDS[:9], k=rng.randint(2, 10)))
            rejected = " ".join(rng.choices(WORDS[9:], k=rng.randint(2, 10)))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def killed_at(run: Path, dest: Path, checkpoint: int) -> Path:
    """What a run killed one logged step after saving ``checkpoint-N`` leaves: that checkpoint and the metrics up
    to step N+1 (not the finished run's later checkpoints, final model or metrics)."""
    dest.mkdir()
    shutil.copytree(run / f"checkpoint-{checkpoint}", dest / f"checkpoint-{checkpoint}")
    for name in ("prefkit_config.yaml", "prefkit_data_fingerprint"):  # written before the first step
        shutil.copy(run / name, dest / name)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= checkpoint + 1 and "train_runtime" not in ln]
    assert any(json.loads(ln)["step"] == checkpoint + 1 for ln in kept)  # a step the resume must log again
    (dest / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    return dest


def assert_each_step_once(out: Path, last: int) -> None:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, last + 1))


def _eval_by_hand(model_path: Path, ref_path: Path, data: Path, beta: float) -> dict:
    """`prefkit eval`'s metrics from plain full-logit forwards, one sequence at a time, on the tokenized pairs
    (the data stage is tested on its own): ranking accuracy on mean token log-probs, implicit rewards
    β·(log π − log π_ref) summed over the response."""
    from transformers import AutoTokenizer

    from prefkit.config import PrefConfig
    from prefkit.data import load_rows, prepare_dataset

    ds, _ = prepare_dataset(load_rows(str(data)), AutoTokenizer.from_pretrained(model_path),
                            PrefConfig(output_dir=str(data.parent / "unused"), max_length=64), source=str(data))

    def response_logps(model, prompt: list[int], response: list[int]) -> tuple[float, int]:
        logits = model(torch.tensor([prompt + response])).logits[0].double().log_softmax(-1)
        picked = logits[len(prompt) - 1 : -1].gather(1, torch.tensor(response)[:, None])
        return picked.sum().item(), len(response)

    policy, ref = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (model_path, ref_path))
    ranked = rewarded = 0
    margins = []
    with torch.no_grad():
        for row in ds:
            (cw, nw), (cl, nl) = (response_logps(policy, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids"))
            rw = beta * (cw - response_logps(ref, row["prompt_ids"], row["chosen_ids"])[0])
            rl = beta * (cl - response_logps(ref, row["prompt_ids"], row["rejected_ids"])[0])
            ranked += cw / nw > cl / nl
            rewarded += rw > rl
            margins.append(rw - rl)
    n = len(ds)
    return {"num_pairs": n, "ranking_accuracy": ranked / n, "implicit_reward_accuracy": rewarded / n,
            "reward_margin": sum(margins) / n}


def _train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "6", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_steps", "3",
            "--learning_rate", "5e-3", "--eval_split_size", "4", "--max_length", "64", "--seed", "7",
            "--dynamics_steps", "2", *extra]


@pytest.mark.slow
def test_train_save_reload_eval_resume(tmp_path: Path, model_dir: Path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 28)
    out = tmp_path / "run"
    assert main(_train_args(model_dir, data, out)) == 0
    printed = capsys.readouterr().out
    assert "ranking accuracy" in printed and "implicit-reward accuracy" in printed

    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in first, key
    assert any("incentive/ratio" in r for r in records)
    results = json.loads((out / "train_results.json").read_text())
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "peak_memory_mb"):
        assert key in results
    assert (out / "prefkit_config.yaml").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(reloaded.lm_head.weight, start.lm_head.weight)  # it did train

    # the run's own reference is named, not loaded: eval takes the reference only from its options
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", str(data), "--max_length", "64"]) == 2
    assert f"--ref_model_name_or_path {model_dir} to score against it" in capsys.readouterr().err
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", str(data),
                 "--max_length", "64", "--ref_model_name_or_path", str(model_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    want = _eval_by_hand(out, model_dir, data, beta=0.1)  # the reference: the model the run started from
    assert metrics["num_pairs"] == want["num_pairs"] == 28
    for key in ("ranking_accuracy", "implicit_reward_accuracy"):  # k/28: exact
        assert metrics[key] == pytest.approx(want[key], abs=1e-9), key
    assert metrics["reward_margin"] == pytest.approx(want["reward_margin"], rel=1e-4, abs=1e-6)

    # Resume a run killed after its step-3 checkpoint: steps 4-6 must repeat the uninterrupted run's losses.
    resumed = killed_at(out, tmp_path / "resumed", 3)
    assert main(_train_args(model_dir, data, resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-3"))) == 0
    assert_each_step_once(resumed, 6)
    full, again = _losses(out), _losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_lora_run_saves_adapter_and_eval_uses_disabled_adapter_as_reference(tmp_path: Path, model_dir: Path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    out = tmp_path / "lora"
    assert main(_train_args(model_dir, data, out, "--use_peft", "true", "--lora_r", "4", "--max_steps", "2",
                            "--reward_calibration", "true")) == 0
    assert (out / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", str(data), "--max_length", "64"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["reward_margin"] is not None
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rc/alpha" in r for r in records)


def test_group_by_length_buckets_pairs_by_token_count(tmp_path: Path, tiny_llama, tiny_tokenizer):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from prefkit import PrefConfig, PrefTrainer

    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 64).read_text().splitlines()]
    from datasets import Dataset

    args = PrefConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                      train_sampling_strategy="group_by_length", max_length=64)
    trainer = PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer)
    ds = trainer.train_dataset
    assert ds["length"] == [len(p) + len(c) + len(r) for p, c, r in
                            zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and list(sampler.lengths) == ds["length"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch.num_pairs == 4


def test_bf16_runs_policy_and_reference_forwards_under_autocast(tmp_path: Path, tiny_llama, tiny_tokenizer,
                                                                 monkeypatch):
    """--bf16: accelerate autocasts only the prepared model's own forward, and prefkit calls the backbone, head
    and reference itself, so the trainer enters autocast for them; the weights stay fp32."""
    from datasets import Dataset

    import prefkit.trainer
    from prefkit import PrefConfig, PrefTrainer

    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 8).read_text().splitlines()]
    args = PrefConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                      bf16=True, max_steps=1, max_length=64, dynamics_steps=0)
    trainer = PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer)
    seen = []
    real = prefkit.trainer.compute_pair_logps

    def recording(model, batch, **kw):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(model, batch, **kw)

    monkeypatch.setattr(prefkit.trainer, "compute_pair_logps", recording)
    trainer.train()
    assert seen == [True, True]  # policy, reference
    assert all(p.dtype == torch.float32 for p in tiny_llama.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_reference_copy_keeps_linear_weights_in_bf16_with_the_same_logps(tmp_path: Path, tiny_tokenizer, tied):
    """Under --bf16 the frozen reference copy stores its linear weights in bf16 (autocast would cast them on every
    call); its log-probs equal those of an fp32 copy under autocast bit for bit. Embeddings, norms and a head
    tied to the embedding stay fp32."""
    import copy

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefkit import PrefConfig, PrefTrainer
    from prefkit.logprobs import compute_pair_logps
    from tests.conftest import _small

    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**_small(len(tiny_tokenizer)), tie_word_embeddings=tied))
    fp32_copy = copy.deepcopy(policy)
    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 8).read_text().splitlines()]
    def trainer(model, bf16):
        args = PrefConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, use_cpu=True,
                          report_to="none", bf16=bf16, max_length=64, dynamics_steps=0)
        return PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=tiny_tokenizer)

    with_bf16 = trainer(policy, True)
    ref = with_bf16.ref_model
    assert ref.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert ref.model.embed_tokens.weight.dtype == ref.model.norm.weight.dtype == torch.float32
    assert ref.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    batch = next(iter(with_bf16.get_train_dataloader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compute_pair_logps(ref, batch), compute_pair_logps(fp32_copy.eval(), batch)
    assert torch.equal(got.chosen, want.chosen) and torch.equal(got.rejected, want.rejected)
    assert trainer(copy.deepcopy(fp32_copy), False).ref_model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_trainer_logs_the_rows_it_skips_when_preparing_raw_rows(tmp_path: Path, tiny_llama, tiny_tokenizer, caplog):
    import logging

    from datasets import Dataset

    from prefkit import PrefConfig, PrefTrainer

    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 6).read_text().splitlines()]
    rows[2]["rejected"] = rows[2]["chosen"]
    args = PrefConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, use_cpu=True, report_to="none",
                      max_length=64, dynamics_steps=0)
    with caplog.at_level(logging.INFO, logger="prefkit"):
        trainer = PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tiny_tokenizer)
    assert trainer.skip_reports["train"].kept == 5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train dataset: 5 of 6 pairs kept; skipped: 1 chosen identical to rejected" in m for m in warned), warned


@pytest.mark.slow
def test_static_eos_padding_trains_on_real_eos_tokens(tmp_path: Path, tiny_llama, tiny_tokenizer, monkeypatch):
    """--granularity static --static_padding eos: the training batch is exactly the one collated from the pairs
    with EOS appended to each shorter response up to the longer's length, and the first step's logged loss and
    gradient norm are that batch's by hand. The gradient norm tells the paddings apart (at step 1 the policy is
    the reference, so the loss is log 2 per window either way, but the scored EOS tokens add gradient)."""
    import copy
    import dataclasses
    import math

    from datasets import Dataset

    import prefkit.trainer
    from prefkit import PrefConfig, PrefTrainer
    from prefkit.data import PairCollator
    from prefkit.logprobs import compute_pair_logps
    from prefkit.objectives import build_objective

    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 4).read_text().splitlines()]
    start = copy.deepcopy(tiny_llama)
    real = prefkit.trainer.compute_pair_logps

    def first_step(padding: str):
        args = PrefConfig(output_dir=str(tmp_path / padding), per_device_train_batch_size=4, use_cpu=True,
                          report_to="none", max_steps=1, logging_steps=1, max_length=64, dynamics_steps=0,
                          granularity="static", window_size=2, static_padding=padding)
        trainer = PrefTrainer(model=copy.deepcopy(start), args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tiny_tokenizer)
        seen = []
        monkeypatch.setattr(prefkit.trainer, "compute_pair_logps", lambda m, b, **kw: seen.append(b) or real(m, b, **kw))
        trainer.train()
        return trainer, seen[0], trainer.state.log_history[0]

    trainer, batch, logged = first_step("eos")
    eos = tiny_tokenizer.eos_token_id
    by_id = {r["row_id"]: r for r in trainer.train_dataset}
    feats = []
    for i in batch.row_ids.tolist():
        c, r = list(by_id[i]["chosen_ids"]), list(by_id[i]["rejected_ids"])
        n = max(len(c), len(r))
        feats.append({"prompt_ids": by_id[i]["prompt_ids"], "chosen_ids": c + [eos] * (n - len(c)),
                      "rejected_ids": r + [eos] * (n - len(r)), "row_id": i})
    assert sum(len(f["chosen_ids"]) != len(by_id[f["row_id"]]["chosen_ids"]) or
               len(f["rejected_ids"]) != len(by_id[f["row_id"]]["rejected_ids"]) for f in feats) == 4
    want = PairCollator(pad_token_id=tiny_tokenizer.pad_token_id, share_prompt=trainer.layout.share_prompt,
                        pack_pairs=trainer.layout.pack_pairs)(feats)  # the layout the trainer resolved
    for f in dataclasses.fields(want):
        a, b = getattr(batch, f.name), getattr(want, f.name)
        assert (a is None and b is None) or (a == b if not torch.is_tensor(b) else torch.equal(a, b)), f.name
    assert torch.equal(want.response_len[:4], want.response_len[4:])

    model = copy.deepcopy(start)
    lp = compute_pair_logps(model, want)
    with torch.no_grad():
        ref = compute_pair_logps(copy.deepcopy(start), want)
    out = build_objective(trainer.args)(lp.replace(ref_chosen=ref.chosen, ref_rejected=ref.rejected))
    out.loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item()
    windows = sum(math.ceil(len(f["chosen_ids"]) / 2) for f in feats) / 4  # per pair, summed over windows
    assert logged["loss"] == pytest.approx(out.loss.item(), rel=1e-5) == pytest.approx(math.log(2) * windows, rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    zero_padded = first_step("zero")[2]
    assert zero_padded["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert abs(zero_padded["grad_norm"] - logged["grad_norm"]) > 1e-3 * logged["grad_norm"]
