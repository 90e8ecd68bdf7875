"""`prefkit bench`: the task's checker, pair building, KL estimate, claim verdicts, config errors, and one
end-to-end micro run that writes the report."""

from __future__ import annotations

import csv
import math
import random
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefkit.bench.arithmetic import Problem, extract_answer, make_problem, make_splits, make_tokenizer
from prefkit.bench.config import load_bench_config
from prefkit.bench.generate import generate, sequence_kl
from prefkit.bench.report import ci95, claim_verdict, own_best_points, read_results, shared_points, summarize
from prefkit.bench.runner import RunResult, planned_runs, point_label, report_only
from prefkit.bench.tasks import _pairs_from_samples, apply_variant, pad_solution, slip_solution
from prefkit.errors import ConfigError


def test_problem_solution_is_a_correct_worked_solution():
    rng = random.Random(3)
    for _ in range(200):
        p = make_problem(rng, num_terms=4, digits=2)
        expr = p.prompt.removeprefix("Q:").removesuffix("=?\n")
        assert p.answer == eval(expr)  # noqa: S307 - digits and +/- only
        lines = p.solution.split("\n")
        assert len(lines) == 4 and lines[-1] == f"A:{p.answer}"
        for line in lines[:-1]:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307


def test_splits_are_disjoint_and_deterministic():
    a = make_splits(7, {"x": 300, "y": 300}, 3, 2)
    b = make_splits(7, {"x": 300, "y": 300}, 3, 2)
    assert a == b
    assert not {p.prompt for p in a["x"]} & {p.prompt for p in a["y"]}


def test_extract_answer_takes_last_final_answer():
    assert extract_answer("12+3=15\nA:15") == 15
    assert extract_answer("A:1\nA:-37") == -37
    assert extract_answer("12+3=15") is None


def test_char_tokenizer_round_trip_and_bos():
    tok = make_tokenizer()
    text = "Q:47+38-19=?\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_pairs_from_samples_pairs_correct_with_incorrect():
    probs = [Problem("Q:1+1=?\n", "1+1=2\nA:2", 2), Problem("Q:2+2=?\n", "2+2=4\nA:4", 4)]
    texts = ["A:2", "A:3", "A:2", "A:5",  # problem 1: one distinct correct, two incorrect
             "A:1", "A:1", "A:3", "A:0"]  # problem 2: nothing correct
    rows, n_both, n_correct = _pairs_from_samples(probs, texts, 4, 5, random.Random(0), extract_answer)
    assert n_both == 1 and n_correct == 2
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == [("A:2", "A:3"), ("A:2", "A:5")]
    rows, _, _ = _pairs_from_samples(probs, texts, 4, 1, random.Random(0), extract_answer, reference_fallback=True)
    assert {r["chosen"] for r in rows if r["prompt"] == "Q:2+2=?\n"} == {"2+2=4\nA:4"}


def test_gsm8k_task_checks_answers_with_the_math_scorer(tmp_path):
    """The bench's GSM8K accuracy uses prefkit.pairs' math checker (one checker, issue 23 §3)."""
    from prefkit.bench import tasks
    from prefkit.pairs.scorers import final_number

    assert tasks.final_number is final_number and not hasattr(tasks, "gsm8k_answer")


def _tiny(tok, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_sequence_kl_is_zero_for_the_same_model_and_matches_hand_value():
    tok = make_tokenizer()
    pol, ref = _tiny(tok, 0), _tiny(tok, 1)
    prompts = ["Q:1+2=?\n", "Q:13-4+7=?\n"]  # different lengths: exercises left padding
    torch.manual_seed(0)
    assert sequence_kl(pol, pol, tok, prompts, max_new_tokens=3) == pytest.approx(0.0, abs=1e-6)
    # one new token: KL of the two next-token distributions, averaged over prompts
    torch.manual_seed(0)
    got = sequence_kl(pol, ref, tok, prompts, max_new_tokens=1)
    want = 0.0
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        lp = pol(ids).logits[0, -1].log_softmax(-1)
        lr = ref(ids).logits[0, -1].log_softmax(-1)
        want += (lp.exp() * (lp - lr)).sum().item() / len(prompts)
    assert got == pytest.approx(want, rel=1e-4)


def test_generate_left_padding_matches_one_by_one():
    tok = make_tokenizer()
    model = _tiny(tok, 0)
    prompts = ["Q:1+2=?\n", "Q:13-4+77=?\n"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1).texts[0] for p in prompts]
    assert batched.texts == single
    assert all(1 <= n <= 6 for n in batched.num_tokens)


def _runs(values: dict[str, list[float]], point: str = "") -> list[RunResult]:
    return [RunResult(method=m, seed=i, point=point, accuracy=v) for m, vs in values.items() for i, v in enumerate(vs)]


def test_claim_verdicts_from_hand_numbers():
    claim = {"text": "x", "method": "A", "baseline": "B", "metric": "accuracy"}
    runs = _runs({"A": [0.50, 0.52, 0.54], "B": [0.40, 0.41, 0.42]})
    mean, std, n = summarize(runs)["A"]["accuracy"]
    assert (mean, n) == (pytest.approx(0.52), 3) and std == pytest.approx(0.02)
    # paired differences 0.10, 0.11, 0.12: mean 0.11, sd 0.01, half-width t(0.975, 2)·0.01/√3 = 4.303·0.005774
    assert ci95([0.10, 0.11, 0.12]) == (pytest.approx(0.11), pytest.approx(4.303 * 0.01 / math.sqrt(3)), 3)
    held = claim_verdict(runs, claim)
    assert held.startswith("**held**") and "95% CI [+0.08516, +0.1348]" in held
    assert claim_verdict(runs, {**claim, "higher_is_better": False}).startswith("**contradicted**")
    # differences -0.1, 0.19, 0.03: mean 0.04, sd 0.1453 → half-width 4.303·0.1453/√3 = 0.361 straddles 0
    noisy = claim_verdict(_runs({"A": [0.3, 0.6, 0.45], "B": [0.40, 0.41, 0.42]}), claim)
    assert noisy.startswith("not resolved") and "smallest detectable effect ±0.36" in noisy
    same = claim_verdict(_runs({"A": [0.40, 0.41, 0.42], "B": [0.40, 0.41, 0.42]}), claim)
    assert same == "no difference (identical in all 3 paired seeds)"
    one = _runs({"A": [0.5], "B": [0.4]})
    assert claim_verdict(one, claim) == "not resolved (one seed, no interval; difference +0.1, the claimed direction)"
    assert claim_verdict(one, {**claim, "higher_is_better": False}).endswith("+0.1, not the claimed direction)")
    assert claim_verdict(one, {**claim, "method": "C"}) == "not run"
    # a lower-is-better metric (KL) takes its direction from METRICS
    kl = [RunResult(method=m, seed=i, kl=v) for m, vs in {"A": [0.1, 0.2, 0.3], "B": [0.5, 0.6, 0.8]}.items()
          for i, v in enumerate(vs)]
    assert claim_verdict(kl, {**claim, "metric": "kl"}).startswith("**held**")


def test_sweep_points_selection_on_validation_only(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ntask: arithmetic\nseeds: [0, 1]\nsweep: {learning_rate: [1.0e-5, 1.0e-4], beta: [0.1]}\n"
                   "select_baseline: DPO\nmethods: {DPO: {}, SimPO: {beta: 2.0}}\n")
    bench = load_bench_config(str(cfg))
    assert bench.points() == [{"learning_rate": 1e-5, "beta": 0.1}, {"learning_rate": 1e-4, "beta": 0.1}]
    assert bench.method_points("SimPO") == [{"learning_rate": 1e-5}, {"learning_rate": 1e-4}]
    plan = planned_runs(bench)
    assert [(m, point_label(p), s) for m, p, s in plan][:4] == [
        ("DPO", "learning_rate=1e-05, beta=0.1", 0), ("DPO", "learning_rate=0.0001, beta=0.1", 0),
        ("SimPO", "learning_rate=1e-05", 0), ("SimPO", "learning_rate=0.0001", 0)]
    assert len(plan) == 8
    lo, hi = "learning_rate=1e-05, beta=0.1", "learning_rate=0.0001, beta=0.1"
    runs = [RunResult("DPO", s, lo, accuracy=0.9, val_accuracy=0.5) for s in (0, 1)]
    runs += [RunResult("DPO", s, hi, accuracy=0.1, val_accuracy=0.6) for s in (0, 1)]  # best on validation
    runs += [RunResult("SimPO", s, "learning_rate=1e-05", accuracy=0.5, val_accuracy=0.7) for s in (0, 1)]
    runs += [RunResult("SimPO", s, "learning_rate=0.0001", accuracy=0.5, val_accuracy=0.2) for s in (0, 1)]
    shared, label = shared_points(bench, runs)
    assert label == hi and shared == {"DPO": hi, "SimPO": "learning_rate=0.0001"}  # test accuracy never looked at
    assert own_best_points(bench, runs) == {"DPO": hi, "SimPO": "learning_rate=1e-05"}


def test_pair_variants():
    rng = random.Random(0)
    sol = "7+5=12\n12-3=9\n9+9=18\nA:18"
    padded = pad_solution(sol, rng, 2)
    lines = padded.split("\n")
    assert len(lines) == 6 and lines[-1] == "A:18" and set(lines[:-1]) <= set(sol.split("\n")[:-1])
    assert extract_answer(padded) == 18
    for seed in range(20):  # one slip, carried on consistently: wrong answer, same prefix up to the slip
        slip = slip_solution(sol, random.Random(seed))
        a, b = sol.split("\n"), slip.split("\n")
        assert len(b) == len(a) and extract_answer(slip) != 18
        first = next(i for i in range(len(a)) if a[i] != b[i])
        assert a[:first] == b[:first] and all(x != y for x, y in zip(a[first:], b[first:]))
        for line in b[:-1]:  # every later step is arithmetic that holds, except the slip itself
            lhs, rhs = line.split("=")
            assert (eval(lhs) == int(rhs)) == (line != b[first])
    rows = [{"prompt": "p", "chosen": sol, "rejected": "x"}, {"prompt": "p", "chosen": sol, "rejected": "y"}]
    assert len(apply_variant(rows, "near_duplicate", rng, 2)) == 1  # one pair per distinct chosen solution
    assert apply_variant(rows, "pad_rejected", rng, 1)[0]["chosen"] == sol


def test_bench_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("name: x\ntask: chess\nmethods: {DPO: {}}\n")
    with pytest.raises(ConfigError, match="task: must be one of"):
        load_bench_config(str(bad))
    bad.write_text("name: x\ntask: arithmetic\nmethods: {DPO: {}}\nclaims: [{text: t, method: DPO, baseline: Z, metric: accuracy}]\n")
    with pytest.raises(ConfigError, match=r"claims\[0\]\.baseline"):
        load_bench_config(str(bad))
    bad.write_text("name: x\ntask: arithmetic\nmethod: {DPO: {}}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_bench_config(str(bad))


MICRO = """
name: micro
title: "Z. micro"
task: arithmetic
task_options: {num_terms: 2, digits: 1, hidden_size: 32, num_layers: 1, num_heads: 2, sft_problems: 50,
               sft_max_steps: 4, sft_eval_steps: 2, sft_batch_size: 16, pref_problems: 12, val_problems: 8,
               test_problems: 8, samples_per_problem: 2, pairs_per_problem: 1, max_new_tokens: 12,
               reference_fallback: true, critical_model_steps: 2}
seeds: [0, 1]
train: {per_device_train_batch_size: 4, max_steps: 3, learning_rate: 1.0e-3, logging_steps: 1, dynamics_steps: 1,
        dynamics_probe_size: 4, max_length: 40}
methods:
  SFT only: {sft_only: true}
  DPO: {}
  DPO+RC: {reward_calibration: true}
  cADPO: {critical_tokens: true, granularity: adaptive, num_segments: 4}
trajectory_methods: [DPO, DPO+RC]
claims:
  - {text: "RC preserves chosen", method: DPO+RC, baseline: DPO, metric: d_logp_chosen}
"""


@pytest.mark.slow
def test_micro_bench_end_to_end(tmp_path, capsys):
    from prefkit.cli import main

    cfg = tmp_path / "micro.yaml"
    cfg.write_text(MICRO)
    results = tmp_path / "bench" / "results" / "micro"
    rc = main(["bench", str(cfg), "--output_dir", str(tmp_path / "work"), "--results_dir", str(results)])
    assert rc == 0
    rows = list(csv.DictReader((results / "results.csv").open()))
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("SFT only", "0"), ("DPO", "0"), ("DPO", "1"), ("DPO+RC", "0"), ("DPO+RC", "1"), ("cADPO", "0"), ("cADPO", "1")]
    dpo = [r for r in rows if r["method"] == "DPO"]
    assert all(r["accuracy"] != "" and float(r["kl"]) >= 0 and r["in_band"] != "" for r in dpo)
    md = (tmp_path / "bench" / "RESULTS.md").read_text()
    assert "## Z. micro" in md and "| DPO+RC |" in md and "RC preserves chosen" in md
    assert (results / "accuracy_vs_kl.png").is_file() and (results / "chosen_trajectories.png").is_file()
    before = (results / "section.md").read_text()
    (results / "section.md").unlink()
    shutil.rmtree(tmp_path / "work" / "runs")  # the committed results folder alone redraws and merges
    assert main(["bench", str(cfg), "--output_dir", str(tmp_path / "work"), "--results_dir", str(results),
                 "--report_only"]) == 0
    assert (results / "section.md").read_text() == before  # same numbers, commit and date from the run
    # a subset rerun replaces that method's rows and keeps the others
    assert main(["bench", str(cfg), "--output_dir", str(tmp_path / "work"), "--results_dir", str(results),
                 "--methods", "DPO"]) == 0
    again = list(csv.DictReader((results / "results.csv").open()))
    assert [(r["method"], r["seed"]) for r in again] == [(r["method"], r["seed"]) for r in rows]
    assert [r for r in again if r["method"] == "DPO+RC"] == [r for r in rows if r["method"] == "DPO+RC"]
    # resumable: a grid killed after its next-to-last run redoes only the last one
    lines = (results / "runs.jsonl").read_text().splitlines()
    (results / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    capsys.readouterr()
    assert main(["bench", str(cfg), "--output_dir", str(tmp_path / "work"), "--results_dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 runs to do, 6 done earlier" in out and "(1/1) DPO seed 1" in out  # the --methods DPO rerun appended DPO last
    assert len((results / "runs.jsonl").read_text().splitlines()) == 7
    assert sorted(p.name for p in (results / "trajectories" / "dpo_rc").iterdir()) == ["seed0.json", "seed1.json"]


@pytest.mark.slow
def test_grid_stopped_midway_still_reports(tmp_path, monkeypatch):
    """A session that ends mid-grid leaves runs.jsonl and bench_state.json; --report_only works from them."""
    import prefkit.bench.runner as runner
    from prefkit.cli import main

    cfg = tmp_path / "micro.yaml"
    cfg.write_text(MICRO.replace("seeds: [0, 1]", "seeds: [0]").replace("  cADPO: {critical_tokens: true, "
                                                                            "granularity: adaptive, num_segments: 4}\n", ""))
    results = tmp_path / "bench" / "results" / "micro"
    real, calls = runner.run_one, []

    def stop_at_third(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_one", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(load_bench_config(str(cfg)), tmp_path / "work", results)
    assert calls == ["SFT only", "DPO", "DPO+RC"]
    assert len((results / "runs.jsonl").read_text().splitlines()) == 2 and (results / "bench_state.json").is_file()
    monkeypatch.setattr(runner, "run_one", real)
    assert main(["bench", str(cfg), "--results_dir", str(results), "--report_only"]) == 0
    section = (results / "section.md").read_text()
    assert "| DPO |" in section and "| DPO+RC |" not in section


def test_no_results_yet_read_as_none_and_report_only_says_so(tmp_path):
    """read_results is the one place that knows the results files: a fresh results dir reads as no runs."""
    assert read_results(tmp_path) == []
    (tmp_path / "bench_state.json").write_text('{"notes": [], "wall_seconds": 0, "provenance": {}}')
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(MICRO)
    with pytest.raises(ConfigError, match="--report_only: no runs and saved state in"):
        report_only(load_bench_config(str(cfg)), tmp_path)
