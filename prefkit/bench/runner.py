"""`prefkit bench CONFIG`: train every method × seed from the same start on the same pairs, measure, report.

Each run goes through the public training path (:func:`prefkit.run.train_main` with options built from the
config), so the bench measures exactly what users run. Held-out metrics per run:

- answer accuracy (greedy decoding, exact checker) and mean generation length on held-out questions;
- KL(π‖π_ref) on held-out prompts (:func:`prefkit.bench.generate.sequence_kl`);
- Δ log π of held-out chosen / rejected responses (summed over tokens, after − before training), implicit-
  reward accuracy and margin (:mod:`prefkit.evaluate`);
- in-band fraction: mean of ``band/in_band`` over the run's dynamics logs (docs/dynamics.md);
- validation accuracy (greedy, on the validation problems): what a sweep's point is picked by, never test.

A run is one (method, sweep point, seed). Each finished run is appended to ``runs.jsonl`` in the results
folder with its commit, so a grid killed at any point resumes where it stopped: runs already there are
skipped (``--methods`` reruns the named methods instead).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch

from prefkit.bench.config import BenchConfig, run_options
from prefkit.bench.report import append_run, provenance, read_results, write_report
from prefkit.bench.results import RunResult, point_label, slug, trajectory_name
from prefkit.bench.tasks import PREPARE, Setup, flat_rejected_weights
from prefkit.configfile import config_from_options
from prefkit.errors import ConfigError

logger = logging.getLogger("prefkit")


def _answer_metrics(model, tokenizer, setup: Setup, reference) -> dict:
    from prefkit.bench.generate import generate, sequence_kl

    if not setup.questions:
        return {}
    gens = generate(model, tokenizer, setup.questions, max_new_tokens=setup.max_new_tokens, batch_size=64)
    correct = [setup.extract(t) == a for t, a in zip(gens.texts, setup.answers)]
    out = {"accuracy": sum(correct) / len(correct), "gen_length": sum(gens.num_tokens) / len(gens.num_tokens)}
    if setup.val_questions:
        val = generate(model, tokenizer, setup.val_questions, max_new_tokens=setup.max_new_tokens, batch_size=64)
        out["val_accuracy"] = sum(setup.extract(t) == a for t, a in zip(val.texts, setup.val_answers)) / len(val.texts)
    if reference is not False and setup.measure_kl:
        torch.manual_seed(0)  # the same sampling noise for every method
        out["kl"] = sequence_kl(model, reference, tokenizer, setup.questions, max_new_tokens=setup.max_new_tokens,
                                batch_size=64)
    return out


def _dynamics_summary(run_dir: Path) -> tuple[float | None, list[tuple[int, float]]]:
    from prefkit.plot import read_metrics

    logs = read_metrics(str(run_dir))
    band = [r["band/in_band"] for r in logs if "band/in_band" in r]
    traj = [(int(r["step"]), float(r["logps/chosen_delta"])) for r in logs if "logps/chosen_delta" in r]
    return (sum(band) / len(band) if band else None), traj


def _train_options(bench: BenchConfig, setup: Setup, method: str, seed: int, run_dir: Path,
                   point: dict | None = None) -> dict:
    opts = bench.methods[method]
    train_file, eval_file = setup.train_file, setup.eval_file
    if opts.get("critical_tokens"):
        train_file, eval_file = setup.weighted_train_file, setup.weighted_eval_file
        if opts.get("token_weights") == "flat_rejected":
            train_file, eval_file = flat_rejected_weights(train_file), flat_rejected_weights(eval_file)
    return {**run_options(bench, method, point),
            "model_name_or_path": setup.model_path, "dataset_name": train_file, "eval_dataset_name": eval_file,
            "eval_split": "train", "output_dir": str(run_dir), "seed": seed,
            "overwrite_output_dir": True, "save_strategy": "no", "disable_tqdm": True}


def run_one(bench: BenchConfig, setup: Setup, method: str, seed: int, run_dir: Path,
            point: dict | None = None) -> RunResult:
    from prefkit.run import load_for_eval, saved_reference, train_main

    opts = bench.methods[method]
    result = RunResult(method=method, seed=seed, point=point_label(point or {}))
    if opts.get("sft_only"):
        cfg = config_from_options({**bench.train, "model_name_or_path": setup.model_path, "output_dir": str(run_dir),
                                   "use_peft": False})
        from prefkit.runsetup import load_model_and_tokenizer

        _, model, tokenizer = load_model_and_tokenizer(cfg)
        result.__dict__.update(_answer_metrics(model, tokenizer, setup, reference=False))
        if setup.questions:
            result.kl = 0.0
        result.d_logp_chosen = result.d_logp_rejected = 0.0
        return result
    cfg = config_from_options(_train_options(bench, setup, method, seed, run_dir, point))
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
        out = train_main(cfg)
    result.train_seconds = time.time() - t0
    after = out["after"]
    if after is not None and after.rewards_chosen is not None:
        result.d_logp_chosen = after.rewards_chosen / cfg.beta
        result.d_logp_rejected = after.rewards_rejected / cfg.beta
        result.reward_accuracy = after.implicit_reward_accuracy
        result.reward_margin = after.reward_margin
        result.ranking_accuracy = after.ranking_accuracy
    result.in_band, traj = _dynamics_summary(run_dir)
    (run_dir / "chosen_trajectory.json").write_text(json.dumps(traj))
    if setup.questions:
        # the bench's own run: its reference is the one it trained against (eval takes it only when named)
        ref = saved_reference(str(run_dir))
        eval_cfg = config_from_options({"model_name_or_path": str(run_dir), "output_dir": str(run_dir),
                                        **({"ref_model_name_or_path": ref} if ref else {})})
        model, tokenizer, reference = load_for_eval(eval_cfg)
        result.__dict__.update(_answer_metrics(model, tokenizer, setup, None if reference == "adapter" else reference))
    for weights in run_dir.glob("*.safetensors"):  # the measured numbers are kept; the weights are not needed
        weights.unlink()
    return result


def planned_runs(bench: BenchConfig, only: list[str] | None = None) -> list[tuple[str, dict, int]]:
    """(method, point, seed) in run order: seed-major, so a grid stopped early has whole seeds done."""
    plan: list[tuple[str, dict, int]] = []
    for i, seed in enumerate(bench.seeds):
        for method, opts in bench.methods.items():
            if (only and method not in only) or (opts.get("sft_only") and i > 0):
                continue
            for point in ([{}] if opts.get("sft_only") else bench.method_points(method)):
                plan.append((method, point, seed))
    return plan


def run_bench(bench: BenchConfig, work_dir: Path, results_dir: Path, *, only: list[str] | None = None) -> list[RunResult]:
    """Prepare once, then every (method, point, seed) not yet in runs.jsonl; each run is appended as it ends."""

    t_start, prov = time.time(), provenance(bench)  # the code that runs is the code at the start
    work_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    done = read_results(results_dir)
    if only:  # a subset run replaces the named methods' runs
        done = [r for r in done if r.method not in only]
    done_keys = {r.key for r in done}
    todo = [(m, p, s) for m, p, s in planned_runs(bench, only) if (m, point_label(p), s) not in done_keys]
    print(f"[bench {bench.name}] {len(todo)} runs to do, {len(done)} done earlier", flush=True)
    print(f"[bench {bench.name}] preparing ({bench.task})", flush=True)
    setup = PREPARE[bench.task](bench, work_dir / "setup")
    for line in setup.notes:
        print(f"  {line}", flush=True)
    results = list(done)
    append_run(results_dir, None, rewrite=done)  # runs.jsonl holds exactly the kept runs
    state_file = results_dir / "bench_state.json"  # committed: notes and wall time survive for --report_only
    earlier = json.loads(state_file.read_text())["wall_seconds"] if state_file.is_file() and done else 0.0

    def save_state() -> dict:  # after every run, so a grid stopped mid-way can still be reported
        state = {"notes": setup.notes, "wall_seconds": earlier + time.time() - t_start, "provenance": prov}
        state_file.write_text(json.dumps(state))
        return state

    state = save_state()
    for n, (method, point, seed) in enumerate(todo, 1):
        t0 = time.time()
        label = point_label(point)
        run_dir = work_dir / "runs" / slug(method) / (slug(label) or "default") / f"seed{seed}"
        r = run_one(bench, setup, method, seed, run_dir, point)
        r.commit = prov["commit"]
        results.append(r)
        append_run(results_dir, r)
        state = save_state()
        if (run_dir / "chosen_trajectory.json").is_file():  # kept with the results: plots redraw without runs
            keep = results_dir / "trajectories" / slug(method) / trajectory_name(label, seed)
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_text((run_dir / "chosen_trajectory.json").read_text())
        shown = ", ".join(f"{k} {v:.3f}" for k, v in r.to_dict().items()
                          if isinstance(v, float) and k != "train_seconds")
        where = f" [{label}]" if label else ""
        print(f"[bench {bench.name}] ({n}/{len(todo)}) {method}{where} seed {seed}: {shown} "
              f"({time.time() - t0:.0f} s)", flush=True)
    write_report(bench, setup, _in_config_order(bench, results), results_dir, wall_seconds=state["wall_seconds"],
                 prov=state["provenance"])
    return results


def _in_config_order(bench: BenchConfig, results: list[RunResult]) -> list[RunResult]:
    order = list(bench.methods)
    return sorted(results, key=lambda r: (order.index(r.method) if r.method in order else len(order), r.point, r.seed))


def report_only(bench: BenchConfig, results_dir: Path) -> None:
    """Rewrite the report and plots from the committed runs (runs.jsonl) and state;
    works on a grid stopped part-way too."""

    state_file = results_dir / "bench_state.json"
    runs = read_results(results_dir)
    if not runs or not state_file.is_file():
        raise ConfigError(f"--report_only: no runs and saved state in {results_dir}")
    state = json.loads(state_file.read_text())
    setup = Setup(model_path=None, train_file="", eval_file="", notes=state["notes"])
    write_report(bench, setup, _in_config_order(bench, runs), results_dir,
                 wall_seconds=state["wall_seconds"], prov=state["provenance"])
