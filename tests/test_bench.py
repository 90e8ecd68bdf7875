"""`prefkit bench`: the task's checker, pair building, KL estimate, claim verdicts, config errors, and one
end-to-end micro run that writes the report."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefkit.bench.arithmetic import Problem, extract_answer, make_problem, make_splits, make_tokenizer
from prefkit.bench.config import load_bench_config
from prefkit.bench.generate import generate, sequence_kl
from prefkit.bench.report import (
    ci95,
    grid_edge,
    own_best_points,
    read_results,
    reused_runs,
    section_verdicts,
    shared_points,
    summarize,
)
from prefkit.bench.runner import RunResult, planned_runs, point_label, report_only
from prefkit.bench.stats import holm, mde, paired_t_p, seeds_for_power, sign_flip_p, t_cdf, t_quantile
from prefkit.bench.tasks import (
    _pairs_from_samples,
    apply_variant,
    pad_solution,
    slip_solution,
    weights_digest,
)
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


def claim_verdict(runs: list[RunResult], claim: dict) -> str:
    return section_verdicts(runs, [claim], [None])[0][0]


def test_claim_verdicts_from_hand_numbers():
    claim = {"text": "x", "method": "A", "baseline": "B", "metric": "accuracy"}
    runs = _runs({"A": [0.50, 0.52, 0.54], "B": [0.40, 0.41, 0.42]})
    mean, std, n = summarize(runs)["A"]["accuracy"]
    assert (mean, n) == (pytest.approx(0.52), 3) and std == pytest.approx(0.02)
    # paired differences 0.10, 0.11, 0.12: mean 0.11, sd 0.01, half-width t(0.975, 2)·0.01/√3 = 4.303·0.005774
    assert ci95([0.10, 0.11, 0.12]) == (pytest.approx(0.11), pytest.approx(4.303 * 0.01 / math.sqrt(3)), 3)
    held = claim_verdict(runs, claim)
    # t = 0.11/(0.01/√3) = 19.05 on 2 df: two-sided p = 1 − t/√(2 + t²) = 0.0027; 3 seeds all positive: 2/8
    assert held.startswith("**held**") and "95% CI [+0.08516, +0.1348]" in held
    assert "p 0.0027, Holm 0.0027, sign-flip 0.25" in held
    assert claim_verdict(runs, {**claim, "higher_is_better": False}).startswith("**contradicted**")
    # differences -0.1, 0.19, 0.03: mean 0.04, sd 0.1453 → half-width 4.303·0.1453/√3 = 0.361 straddles 0;
    # MDE = (t(0.975, 2) + t(0.8, 2))·sd/√3 = (4.303 + 1.061)·0.1453/√3 = 0.45
    noisy = claim_verdict(_runs({"A": [0.3, 0.6, 0.45], "B": [0.40, 0.41, 0.42]}), claim)
    assert noisy.startswith("not resolved") and "CI half-width ±0.36" in noisy
    assert "minimum detectable effect at 80% power ±0.45" in noisy
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


def test_holm_decides_and_a_claim_at_the_same_points_counts_once():
    # differences A−B: 0.02, 0.03, 0.025, 0.035, 0.015 (p = 0.0021); C−B: -0.01, 0.05, 0.02, 0.04, 0.0 (p = 0.17)
    runs = _runs({"A": [0.42, 0.43, 0.425, 0.435, 0.415], "B": [0.4] * 5, "C": [0.39, 0.45, 0.42, 0.44, 0.4]})
    a = {"text": "a", "method": "A", "baseline": "B", "metric": "accuracy"}
    c = {"text": "c", "method": "C", "baseline": "B", "metric": "accuracy"}
    pa = paired_t_p([0.02, 0.03, 0.025, 0.035, 0.015])
    pc = paired_t_p([-0.01, 0.05, 0.02, 0.04, 0.0])
    assert pa < 0.025 < 0.05 < pc
    [[va, vc]] = section_verdicts(runs, [a, c], [None])
    assert va.startswith("**held**") and f"Holm {min(1, 2 * pa):.2g}," in va and f"Holm {pc:.2g}," in vc
    # the same comparison in two views is one test: the family stays 2
    both = section_verdicts(runs, [a, c], [None, {"A": "", "B": "", "C": ""}])
    assert both[0] == both[1] == [va, vc]
    # a third, strong-looking test that Holm turns: raw p < 0.05 alone no longer holds
    d = {"text": "d", "method": "D", "baseline": "B", "metric": "accuracy"}
    runs += _runs({"D": [0.40 + x for x in (0.01, 0.03, 0.005, 0.04, 0.015)]})
    pd = paired_t_p([0.01, 0.03, 0.005, 0.04, 0.015])
    [[_, _, vd]] = section_verdicts(runs, [a, c, d], [None])
    assert pd < 0.05 and 2 * pd > 0.05  # p 0.037, the second smallest of three: ×2
    assert vd.startswith("not resolved") and "the CI excludes 0 but Holm's p does not survive" in vd


def test_statistics_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])  # ×4, ×3 → max, ×2 → 0.09, ×1
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6]) and holm([]) == []
    # sign flips: n = 5 all positive → only +++++ and −−−−− reach |Σ|: 2/32; [3, 1, 1]: 2 of 8; Σ = 0 → 1
    assert sign_flip_p([1, 2, 3, 4, 5]) == 0.0625 and sign_flip_p([3, 1, 1]) == 0.25
    assert sign_flip_p([1, -1, 1, -1]) == 1.0
    # 17 seeds: Monte Carlo from a fixed seed, counted with the observed pattern; reproducible
    big = [1.0] * 17
    assert sign_flip_p(big) == sign_flip_p(big) and sign_flip_p(big) < 1e-3
    # Student's t: df = 2 has F(t) = ½ + t/(2√(2 + t²)); quantiles against the table
    assert t_cdf(1.5, 2) == pytest.approx(0.5 + 1.5 / (2 * math.sqrt(2 + 1.5**2)), rel=1e-10)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=5e-4) and t_quantile(0.8, 4) == pytest.approx(0.941, abs=5e-4)
    assert t_quantile(0.8, 9) == pytest.approx(0.883, abs=5e-4)
    assert mde(1.0, 5) == pytest.approx((2.7764 + 0.9410) / math.sqrt(5), rel=1e-3)
    # paired t-test, standardized effect 0.5, α 0.05, 80% power: 34 pairs (the textbook figure)
    assert seeds_for_power(sd=2.0, effect=1.0) == 34 and seeds_for_power(sd=1.0, effect=1.0) == 10


def test_grid_edge_and_reused_runs(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("name: e\ntask: arithmetic\nsweep: {learning_rate: [1.0e-5, 3.0e-5, 1.0e-4]}\n"
                   "methods: {DPO: {}, S: {learning_rate: 1.0e-5}}\nreuses: [other]\n")
    bench = load_bench_config(str(cfg))
    assert grid_edge(bench, "DPO", "learning_rate=1e-05") == " (grid edge: lowest learning_rate)"
    assert grid_edge(bench, "DPO", "learning_rate=0.0001") == " (grid edge: highest learning_rate)"
    assert grid_edge(bench, "DPO", "learning_rate=3e-05") == "" and grid_edge(bench, "S", "") == ""
    # an explicit list of points: lr·β fixed per β; the edge is along lr at the point's own β
    cfg.write_text("name: e\ntask: arithmetic\nmethods: {DPO: {}}\nsweep: [{beta: 0.1, learning_rate: 1.0e-5}, "
                   "{beta: 0.1, learning_rate: 2.0e-5}, {beta: 0.1, learning_rate: 4.0e-5}, "
                   "{beta: 1.0, learning_rate: 1.0e-6}, {beta: 1.0, learning_rate: 2.0e-6}]\n")
    listed = load_bench_config(str(cfg))
    assert [point_label(p) for p in listed.points()][:2] == ["beta=0.1, learning_rate=1e-05",
                                                             "beta=0.1, learning_rate=2e-05"]
    assert grid_edge(listed, "DPO", "beta=0.1, learning_rate=2e-05") == ""
    assert grid_edge(listed, "DPO", "beta=1.0, learning_rate=2e-06") == " (grid edge: highest learning_rate)"
    cfg.write_text("name: e\ntask: arithmetic\nmethods: {DPO: {}}\nsweep: [{beta: 0.1}, {learning_rate: 1.0e-5}]\n")
    with pytest.raises(ConfigError, match="sweep: a list of points"):
        load_bench_config(str(cfg))
    # reused: identical records of another section's runs.jsonl
    (tmp_path / "other").mkdir()
    (tmp_path / "mine").mkdir()
    shared_run = RunResult("DPO", 0, "learning_rate=1e-05", accuracy=0.5, commit="abc")
    (tmp_path / "other" / "runs.jsonl").write_text(json.dumps(shared_run.to_dict()) + "\n")
    own = [shared_run, RunResult("DPO", 1, "learning_rate=1e-05", accuracy=0.5, commit="abc"),
           RunResult("DPO", 0, "learning_rate=3e-05", accuracy=0.4, commit="def")]
    assert reused_runs(bench, own, tmp_path / "mine") == {"other": {("DPO", "learning_rate=1e-05", 0)}}


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


def test_readme_verdict_block_is_the_generated_one():
    """README's verdict table is what `prefkit bench --report_only` generates from the committed results."""
    from prefkit.bench.report import README_END, README_START, verdict_block

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert readme.count(README_START) == 1 and readme.count(README_END) == 1
    block = readme[readme.index(README_START): readme.index(README_END) + len(README_END)]
    assert block == verdict_block(root / "benchmarks", root / "benchmarks" / "results")


def test_report_only_writes_the_readme_block_found_from_the_config(tmp_path, monkeypatch):
    from prefkit.bench.report import README_END, README_START, regenerate_readme_block

    bench_dir, elsewhere = tmp_path / "repo" / "benchmarks", tmp_path / "cwd"
    (bench_dir / "results" / "s").mkdir(parents=True)
    elsewhere.mkdir()
    (bench_dir / "bench_s.yaml").write_text("name: s\ntitle: S. s\ntask: arithmetic\nseeds: [0, 1]\nmethods: {A: {}, B: {}}\n"
                                            "claims: [{text: A beats B, method: A, baseline: B, metric: accuracy}]\n")
    runs = _runs({"A": [0.5, 0.6], "B": [0.4, 0.45]})
    (bench_dir / "results" / "s" / "runs.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in runs))
    readme = tmp_path / "repo" / "README.md"
    readme.write_text(f"intro\n{README_START}\nstale\n{README_END}\nrest\n")
    monkeypatch.chdir(elsewhere)  # found from the config's folder, not the working directory
    assert regenerate_readme_block(bench_dir, bench_dir / "results")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "stale" not in text
    assert "| S | A beats B | – | not resolved: +12.5 points" in text
    assert not regenerate_readme_block(bench_dir, tmp_path / "other_results")  # results elsewhere: README untouched


def test_flat_rejected_weights_keep_the_mean_and_drop_the_position(tmp_path):
    from prefkit.bench.tasks import flat_rejected_weights

    src = tmp_path / "pairs_weighted.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_token_weights": [1.0, 0.5],
             "rejected_token_weights": [0.1, 0.0, 0.5]}]
    src.write_text(json.dumps(rows[0]) + "\n")
    out = flat_rejected_weights(str(src))
    assert out.endswith("pairs_weighted_flat.jsonl")
    got = json.loads(Path(out).read_text())
    assert got["chosen_token_weights"] == [1.0, 1.0] and got["rejected_token_weights"] == pytest.approx([0.2] * 3)
    assert got["prompt"] == "p" and json.loads(src.read_text()) == rows[0]  # the source is left as it was


def test_a5_and_control_configs_and_claim_points(tmp_path):
    a5 = load_bench_config("benchmarks/bench_arithmetic_adpo.yaml")
    lr_beta = sorted({float(f"{p['learning_rate'] * p['beta']:.3g}") for p in a5.points()})  # lr to 4 digits
    # the pilot's 3 × 3 grid, then its edges extended (β = 0.1 lower; β = 0.3 and 1.0 higher)
    assert lr_beta == [2.5e-7, 5e-7, 1e-6, 2e-6, 4e-6, 8e-6, 1.6e-5, 3.2e-5, 6.4e-5, 1.28e-4, 2.56e-4] and sorted({p["beta"] for p in a5.points()}) == [0.1, 0.3, 1.0]
    assert a5.train["num_train_epochs"] == 2 and a5.task_options["sft_from"] == "arithmetic"
    assert point_label(a5.claims[2]["point"]) == "beta=1.0, learning_rate=2e-06"
    assert point_label(a5.claims[4]["point"]) == "beta=1.0, learning_rate=8e-06"
    assert point_label(a5.claims[6]["point"]) == "beta=1.0, learning_rate=6.4e-05"
    power = load_bench_config("benchmarks/bench_arithmetic_adpo_power.yaml")  # A7: A5's claim points, more seeds
    assert power.task_options == a5.task_options and power.seeds == list(range(18)) and power.reuses == [a5.name]
    assert {point_label(p) for p in power.points()} == {point_label(c["point"]) for c in power.claims} == {
        point_label(c["point"]) for c in a5.claims[6:]}  # A5's (b) rows at 6.4e-5 and 2.56e-4
    flat = load_bench_config("benchmarks/bench_arithmetic_cadpo_flat.yaml")
    assert flat.methods["cADPO flat"]["token_weights"] == "flat_rejected"
    # a claim at a fixed point is one comparison in both views
    runs = [RunResult(m, s, p, accuracy=a, val_accuracy=v) for m, s, p, a, v in [
        ("A", 0, "learning_rate=1e-05", 0.5, 0.9), ("A", 1, "learning_rate=1e-05", 0.6, 0.9),
        ("B", 0, "learning_rate=1e-05", 0.5, 0.9), ("B", 1, "learning_rate=1e-05", 0.5, 0.9),
        ("A", 0, "learning_rate=0.0001", 0.3, 0.1), ("A", 1, "learning_rate=0.0001", 0.35, 0.1),
        ("B", 0, "learning_rate=0.0001", 0.1, 0.1), ("B", 1, "learning_rate=0.0001", 0.12, 0.1)]]
    claim = {"text": "c", "method": "A", "baseline": "B", "metric": "accuracy", "point": {"learning_rate": 1e-4}}
    shared = {"A": "learning_rate=1e-05", "B": "learning_rate=1e-05"}
    [[v1], [v2]] = section_verdicts(runs, [claim], [shared, shared])
    assert v1 == v2 and "difference +0.215" in v1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\ntask: arithmetic\nsweep: {learning_rate: [1.0e-5]}\nmethods: {A: {}, B: {}}\n"
                   "claims: [{text: t, method: A, baseline: B, metric: accuracy, point: {learning_rate: 3.0e-5}}]\n")
    with pytest.raises(ConfigError, match=r"claims\[0\]\.point: .* is not a point of the sweep"):
        load_bench_config(str(cfg))
    cfg.write_text("name: c\ntask: arithmetic\nmethods: {A: {token_weights: flat_rejected}}\n")
    with pytest.raises(ConfigError, match=r"methods\.A\.token_weights: .* with critical_tokens: true"):
        load_bench_config(str(cfg))


def test_splits_may_fill_three_quarters_of_the_distinct_problems():
    # 2 one-digit terms: 9·9·2 = 162 distinct problems
    assert len(make_splits(0, {"a": 100, "b": 21}, 2, 1)["b"]) == 21
    with pytest.raises(ConfigError, match="at most three quarters"):
        make_splits(0, {"a": 100, "b": 22}, 2, 1)


def test_provenance_ignores_the_bench_outputs_but_not_code(tmp_path, monkeypatch):
    import subprocess

    from prefkit.bench.report import _git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for f in ("README.md", "benchmarks/RESULTS.md", "benchmarks/results/a/runs.jsonl", "prefkit/x.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    monkeypatch.chdir(tmp_path / "benchmarks")  # a run started from a subfolder sees the same
    for f in ("README.md", "benchmarks/RESULTS.md", "benchmarks/results/a/runs.jsonl"):
        (tmp_path / f).write_text("1\n")  # what a resumed grid writes
    assert "uncommitted" not in _git_commit()
    (tmp_path / "prefkit/x.py").write_text("1\n")
    assert _git_commit().endswith(" (with uncommitted changes)")


def test_weights_digest_tells_models_apart():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b = copy.deepcopy(a)
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 16
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-7  # one parameter's last bits
    assert weights_digest(a) != weights_digest(b)
    c = copy.deepcopy(a)
    c[1].running_mean += 1.0  # a buffer counts too
    assert weights_digest(a) != weights_digest(c)


def test_a_tie_in_validation_accuracy_goes_to_the_earlier_point_in_both_views(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\ntask: arithmetic\nsweep: {learning_rate: [1.0e-5, 3.0e-5]}\nmethods: {A: {}, B: {}}\n"
                   "select_baseline: A\n")
    bench = load_bench_config(str(cfg))
    # the same 816 of 1,500 problems at both points, but the float means differ in the last bit (0.5439…9 vs
    # 0.544); the later point's runs come first, as they do in a report sorted by point label
    vals = {"learning_rate=3e-05": [0.466, 0.614, 0.552], "learning_rate=1e-05": [0.438, 0.758, 0.436]}
    assert sum(vals["learning_rate=3e-05"]) / 3 != sum(vals["learning_rate=1e-05"]) / 3
    runs = [RunResult(m, s, p, accuracy=0.5, val_accuracy=v[s]) for p, v in vals.items() for m in "AB"
            for s in range(3)]
    assert own_best_points(bench, runs) == {"A": "learning_rate=1e-05", "B": "learning_rate=1e-05"}
    assert shared_points(bench, runs)[1] == "learning_rate=1e-05"
