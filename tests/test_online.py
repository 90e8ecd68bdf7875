"""`prefkit train --rounds`: two rounds log, the reference stays the starting model (or, with --sync_ref_model,
becomes the policy at each round boundary), and a run stopped at a round boundary (with a half-written next
round) resumes to the same pairs and curve as an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

from prefkit.cli import main
from prefkit.online import (
    REFERENCE_FILE,
    ROUND_MARKER,
    TRAINABLE_FILE,
    finished_rounds,
    merge_summaries,
    round_prompts,
)

PROMPTS = [{"prompt": p} for p in ("what is the cat ?", "the dog ran", "is it good ?", "a big red cat", "hello")]


@pytest.fixture
def length_scorer(tmp_path, monkeypatch):
    (tmp_path / "round_scorers.py").write_text(
        "def length(prompt, completion, row):\n    return float(len(completion.split()))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "python:round_scorers:length"
    sys.modules.pop("round_scorers", None)


def _args(model_dir, prompts, out, scorer, rounds, *extra):
    return ["train", "--model_name_or_path", str(model_dir), "--online_prompts", str(prompts), "--online_scorer",
            scorer, "--rounds", str(rounds), "--samples_per_round", "3", "--online_num_samples", "4",
            "--online_max_new_tokens", "6", "--online_pairing", "all", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "5e-3",
            "--max_length", "64", "--seed", "3", "--use_cpu", "true", "--report_to", "none", *extra]


def _curve(run, r):
    return [(x["step"], x["loss"], x["rewards/chosen"]) for x in map(json.loads, (run / f"round-{r}" / "metrics.jsonl")
                                                                        .read_text().splitlines()) if "loss" in x]


@pytest.mark.slow
def test_rounds_log_and_resume_at_a_round_boundary(model_dir, tmp_jsonl, tmp_path, length_scorer):
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    full = tmp_path / "full"
    assert main(_args(model_dir, prompts, full, length_scorer, 2)) == 0
    records = [json.loads(ln) for ln in (full / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["pairs"] > 0 and r["prompts"] == 3 and 0 <= r["share_correct"] <= 1
        assert r["train_loss"] is not None and r["generation_tokens_per_second"] > 0
    # round 2 continues from round 1's policy but scores against the starting model: its first log (taken
    # before round 2's first update) already shows non-zero implicit rewards
    assert abs(_curve(full, 2)[0][2]) > 1e-6
    assert (full / "config.json").is_file() and (full / "round-2" / "config.json").is_file()

    # stopped after round 1, killed while round 2 was being written, resumed
    part = tmp_path / "part"
    assert main(_args(model_dir, prompts, part, length_scorer, 1)) == 0
    assert finished_rounds(part) == 1
    (part / "round-2").mkdir()
    (part / "round-2" / "pairs.jsonl").write_text('{"prompt": "half')
    (part / "round-2" / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0, "rewards/chosen": 9.0}\n')
    assert main(_args(model_dir, prompts, part, length_scorer, 2, "--resume_from_checkpoint", "latest")) == 0
    for r in (1, 2):
        assert (part / f"round-{r}" / "pairs.jsonl").read_text() == (full / f"round-{r}" / "pairs.jsonl").read_text()
        got, want = _curve(part, r), _curve(full, r)
        assert [s for s, _, _ in got] == [s for s, _, _ in want] == [1, 2]
        assert [l for _, l, _ in got] == pytest.approx([l for _, l, _ in want], abs=1e-6)
    resumed = [json.loads(ln) for ln in (part / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["pairs"], r["share_correct"]) for r in resumed] == \
        [(r["round"], r["pairs"], r["share_correct"]) for r in records]
    assert (part / "round-2" / ROUND_MARKER).is_file()
    shutil.rmtree(part)


def _first_log(run, r):
    return next(x for x in map(json.loads, (run / f"round-{r}" / "metrics.jsonl").read_text().splitlines())
                if "loss" in x)


@pytest.mark.slow
def test_sync_ref_model_makes_each_round_start_from_its_own_reference(model_dir, tmp_jsonl, tmp_path,
                                                                    length_scorer):
    """--sync_ref_model --ref_model_mixup_alpha 1: round 2 scores against round 1's final policy, so its first
    step (logged before any round-2 update) has policy = reference: zero implicit rewards and DPO loss log 2.
    A run stopped after round 1 and resumed recovers that reference from round-1/ and gives the same curve."""
    from safetensors.torch import load_file

    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    sync = ("--sync_ref_model", "true", "--ref_model_mixup_alpha", "1", "--loss_type", "sigmoid")
    full = tmp_path / "full"
    assert main(_args(model_dir, prompts, full, length_scorer, 2, *sync)) == 0
    first = _first_log(full, 2)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert abs(_first_log(full, 1)["loss"] - math.log(2)) < 1e-5  # round 1: the starting model is both
    policy, ref = load_file(str(full / "round-1" / TRAINABLE_FILE)), load_file(str(full / "round-1" / REFERENCE_FILE))
    assert set(policy) == set(ref) and all(torch.equal(policy[k], ref[k]) for k in policy)

    part = tmp_path / "part"
    assert main(_args(model_dir, prompts, part, length_scorer, 1, *sync)) == 0
    assert main(_args(model_dir, prompts, part, length_scorer, 2, *sync, "--resume_from_checkpoint", "latest")) == 0
    for r in (1, 2):
        assert (part / f"round-{r}" / "pairs.jsonl").read_text() == (full / f"round-{r}" / "pairs.jsonl").read_text()
        assert [l for _, l, _ in _curve(part, r)] == pytest.approx([l for _, l, _ in _curve(full, r)], abs=1e-6)
    # resuming without the option would silently change round 2's reference: refused
    assert main(_args(model_dir, prompts, part, length_scorer, 3, "--resume_from_checkpoint", "latest")) == 2


def test_sync_ref_model_mixes_at_round_boundaries(model_dir, tmp_jsonl, tmp_path, length_scorer):
    """TR-DPO's soft update at the round boundary: reference after round 1 = α·policy + (1 − α)·start."""
    from safetensors.torch import load_file

    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "mix"
    assert main(_args(model_dir, prompts, out, length_scorer, 1, "--sync_ref_model", "true",
                      "--ref_model_mixup_alpha", "0.25")) == 0
    start = load_file(str(model_dir / "model.safetensors"))
    policy, ref = load_file(str(out / "round-1" / TRAINABLE_FILE)), load_file(str(out / "round-1" / REFERENCE_FILE))
    moved = [k for k in policy if not torch.equal(policy[k], start[k])]
    assert moved
    for k in policy:
        assert torch.allclose(ref[k], 0.25 * policy[k] + 0.75 * start[k], atol=1e-6), k


@pytest.mark.slow
def test_rounds_reference_fallback_pairs_the_reference_when_no_sample_is_correct(model_dir, tmp_jsonl, tmp_path,
                                                                                   capsys):
    """A random tiny model never answers "#### 5": with --online_reference_fallback every prompt pairs its reference
    solution (chosen) against a sample; a row without one is one clear error naming it."""
    rows = [{"prompt": p["prompt"], "answer": f"so it is {i}\n#### {i + 1000}"} for i, p in enumerate(PROMPTS)]
    prompts = tmp_jsonl(rows, "prompts.jsonl")
    out = tmp_path / "fb"
    assert main(_args(model_dir, prompts, out, "math", 1, "--online_pairing", "best_worst",
                      "--online_reference_fallback", "answer")) == 0
    pairs = [json.loads(ln) for ln in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == [[{"role": "assistant", "content": r["answer"]}] for r in rows[:3]]
    assert all(p["chosen_index"] == -1 and p["rejected_score"] == 0 for p in pairs)
    (record,) = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines()]
    assert record["pairs"] == 3 and record["train_loss"] is not None
    rows[1].pop("answer")
    bad = tmp_jsonl(rows, "bad.jsonl")
    assert main(_args(model_dir, bad, tmp_path / "bad", "regex:(\\d+)", 1, "--online_reference_field", "prompt",
                      "--online_reference_fallback", "answer")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, row 2, field 'answer'" in err and "Traceback" not in err


def test_rounds_options_are_checked(model_dir, tmp_jsonl, tmp_path, capsys):
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "run"
    assert main(_args(model_dir, prompts, out, "bogus", 1)) == 2
    assert main(_args(model_dir, prompts, out, "math", 0)) == 2
    assert main(_args(model_dir, prompts, out, "math", 1, "--dataset_name", str(prompts))) == 2
    # a reference that changes every round can neither be LoRA's adapter-free base nor read from the cache
    assert main(_args(model_dir, prompts, out, "math", 1, "--sync_ref_model", "true", "--use_peft", "true")) == 2
    assert main(_args(model_dir, prompts, out, "math", 1, "--sync_ref_model", "true",
                      "--precompute_ref_log_probs", "true")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("prefkit: error:")]
    assert "unknown spec 'bogus'" in err[0] and "--rounds" in err[1] and "--dataset_name" in err[2]
    assert "--sync_ref_model" in err[3] and "precompute" in err[4]


def test_round_prompts_cycle_and_summaries_merge():
    rows = [{"i": i} for i in range(5)]
    assert [r["i"] for r in round_prompts(rows, 1, 3)] == [0, 1, 2]
    assert [r["i"] for r in round_prompts(rows, 2, 3)] == [3, 4, 0]
    a = dict(prompts=2, samples=8, nan_dropped=0, duplicates=1, correct=2, prompts_with_pair=1, pairs=2,
             tied_pairs=0, reference_fallbacks=0, generated_tokens=40, generation_seconds=2.0,
             score_histogram={"0": 6, "1": 2}, backend="hf")
    b = {**a, "correct": 6, "generation_seconds": 4.0, "score_histogram": {"1": 6, "0": 2}}
    s = merge_summaries([a, b])
    assert (s.samples, s.correct, s.share_correct, s.tokens_per_second) == (16, 8, 0.5, 20.0)
    assert s.score_histogram == {"0": 8, "1": 8}


@pytest.mark.slow
def test_rounds_under_two_gloo_processes_gather_every_ranks_pairs(model_dir, tmp_jsonl, tmp_path, length_scorer,
                                                                  monkeypatch):
    """Each rank samples its shard of the round's prompts (3 prompts: 2 on rank 0, 1 on rank 1); every pair
    reaches the pairs file and both ranks train on all of them."""
    from tests.test_distributed import _launch

    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "ddp"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    _launch(_args(model_dir, prompts, out, length_scorer, 1))
    (record,) = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines()]
    rows = [json.loads(ln) for ln in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert record["prompts"] == 3 and record["samples"] == 12 and record["pairs"] == len(rows) > 0
    assert {r["seed"] for r in rows} <= {3 + 1000, 3 + 1001} and record["train_loss"] is not None


@pytest.mark.slow
def test_rounds_sample_under_the_runs_autocast(model_dir, tmp_jsonl, tmp_path, length_scorer, monkeypatch):
    """`--rounds` with --bf16: each round's samples are generated under bf16 autocast (an intermediate's dtype,
    through a forward hook on the model's first linear layer)."""
    import prefkit.online

    real, seen = prefkit.online.make_pairs, []

    def spying(model, *a, **kw):
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        handle = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        try:
            return real(model, *a, **kw)
        finally:
            handle.remove()

    monkeypatch.setattr(prefkit.online, "make_pairs", spying)
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    assert main(_args(model_dir, prompts, tmp_path / "run", length_scorer, 1, "--bf16", "true")) == 0
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.slow
def test_rounds_sample_with_vllm_from_each_rounds_policy(model_dir, tmp_jsonl, tmp_path, length_scorer, monkeypatch,
                                                        capsys):
    """`--rounds 2 --online_backend vllm` (a stand-in vLLM): every round builds an engine from the policy as the
    round starts, saved with its tokenizer, with the memory share asked for and the run's dtype; the prompts go in
    as prefkit's ids; the saved policy is removed once sampled; round 2's weights are round 1's trained ones."""
    from safetensors.torch import load_file

    import prefkit.pairs.sample as sample
    from prefkit.pairs.pipeline import render_prompts
    from tests import fake_vllm

    fake, record = fake_vllm.make()
    weights = []
    record.on_build.append(lambda d: weights.append(load_file(str(d / "model.safetensors"))))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(sample, "cuda_visible", lambda: True)
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "run"
    assert main(_args(model_dir, prompts, out, length_scorer, 2, "--online_backend", "vllm",
                      "--vllm_gpu_memory_utilization", "0.4")) == 0
    assert [k["model"] for k in record.llm_kwargs] == [str(out / f"round-{r}" / "vllm-policy") for r in (1, 2)]
    assert all(k["gpu_memory_utilization"] == 0.4 and k["dtype"] == "float32" for k in record.llm_kwargs)
    assert all({"config.json", "model.safetensors", "tokenizer.json"} <= set(f) for f in record.model_files)
    assert not any((out / f"round-{r}" / "vllm-policy").exists() for r in (1, 2))
    start = load_file(str(model_dir / "model.safetensors"))
    trained = load_file(str(out / "round-1" / TRAINABLE_FILE))
    assert all(torch.equal(weights[0][k], start[k]) for k in start)
    assert all(torch.equal(weights[1][k], trained[k]) for k in trained) and any(
        not torch.equal(start[k], trained[k]) for k in trained)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for r, inputs in zip((1, 2), record.inputs):
        _, texts = render_prompts(round_prompts(PROMPTS, r, 3), tok, prompt_field="prompt", chat="auto", source="")
        assert inputs == [{"prompt_token_ids": ids} for ids in sample.prompt_token_ids(tok, texts)]
    records = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in records] == [3 * 6, 3 * 6]  # 4 samples of 1-4 words: all 6 pairs of each prompt
    capsys.readouterr()
    # the vLLM options are refused where they would change nothing
    assert main(_args(model_dir, prompts, tmp_path / "x", length_scorer, 1, "--vllm_gpu_memory_utilization", "0.4")) == 2
    monkeypatch.setattr(sample, "cuda_visible", lambda: False)
    assert main(_args(model_dir, prompts, tmp_path / "y", length_scorer, 1, "--online_backend", "vllm")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("prefkit: error:")]
    assert "--vllm_gpu_memory_utilization: only used with --online_backend vllm" in err[0]
    assert "--online_backend vllm: needs a CUDA GPU" in err[1]
