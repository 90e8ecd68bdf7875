"""Bench report: runs.jsonl (one line per run), results.csv, per-method summaries, claim verdicts with 95%
confidence intervals, plots, and ``benchmarks/RESULTS.md`` regenerated from every section present.

A claim compares one method with a baseline on one metric. Methods share seeds (same data order), so the
verdict uses the per-seed paired difference d_s = method_s − baseline_s: its mean and the 95% t-interval
mean ± t(0.975, n−1)·sd/√n. *held* if the interval lies wholly on the claimed side of 0, *contradicted* if
wholly on the other side, otherwise *not resolved*, and then its half-width is the smallest effect the run
could have detected. With a sweep the claims are judged twice: every method at the baseline's best
validation point (shared), and every method at its own best validation point. With one seed there is no
interval: the verdict is *not resolved*, with the signed difference shown.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from prefkit.bench.config import BenchConfig
from prefkit.bench.results import RunResult, point_label, slug, trajectory_name
from prefkit.bench.stats import holm, mde, paired_t_p, seeds_for_power, sign_flip_p, t_quantile
from prefkit.bench.tasks import Setup

METRICS = [  # (field, column title, percent?, higher is better?)
    ("accuracy", "answer acc.", True, True),
    ("val_accuracy", "val. acc.", True, True),
    ("kl", "KL to ref", False, False),
    ("gen_length", "gen. length", False, None),
    ("d_logp_chosen", "Δ logp chosen", False, True),
    ("d_logp_rejected", "Δ logp rejected", False, False),
    ("reward_accuracy", "reward acc.", True, True),
    ("reward_margin", "margin", False, True),
    ("in_band", "in band", True, True),
]

# two-sided 95% quantiles of Student's t, df = 1..30 (beyond: computed)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else t_quantile(0.975, df)


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def ci95(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n); half-width 0 for one value."""
    mean, sd, n = _stats(values)
    return mean, (t975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0), n


def per_seed(results: list[RunResult], method: str, point: str, metric: str) -> dict[int, float]:
    return {r.seed: getattr(r, metric) for r in results
            if r.method == method and r.point == point and getattr(r, metric) is not None}


def _mean_val_accuracy(results: list[RunResult], method: str, point: str) -> float:
    """What selects a sweep point: validation accuracy, mean over seeds (−inf when never measured)."""
    vals = per_seed(results, method, point, "val_accuracy")
    # rounded: equal totals can give means that differ in the last bit, and a tie must stay a tie (it
    # goes to the earlier point in the config, in both views)
    return round(sum(vals.values()) / len(vals), 12) if vals else -math.inf


def summarize(results: list[RunResult], chosen: dict[str, str] | None = None
              ) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method → metric → (mean, std, n) over seeds, at the point ``chosen[method]`` (default: the only one)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for r in results:
        if chosen is None or chosen.get(r.method) == r.point:
            out.setdefault(r.method, {})
    for method in out:
        runs = [r for r in results if r.method == method and (chosen is None or chosen.get(method) == r.point)]
        for name, *_ in METRICS + [("train_seconds", "", False, None)]:
            vals = [getattr(r, name) for r in runs if getattr(r, name) is not None]
            if vals:
                out[method][name] = _stats(vals)
    return out


def _fmt(stat: tuple[float, float, int] | None, pct: bool) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    scale = 100.0 if pct else 1.0
    digits = 1 if pct else 3
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


ALPHA = 0.05


@dataclass
class PairedTest:
    """One claim's paired comparison: per-seed differences ``method − baseline`` on the seeds both have."""

    kind: str  # "not run" | "one seed" | "identical" | "t"
    sign: float = 1.0  # +1 when higher is better
    diffs: list[float] = field(default_factory=list)
    raw: float = 0.0  # one seed: the difference of means
    p: float | None = None  # two-sided paired t-test
    perm_p: float | None = None  # two-sided sign-flip permutation test

    def text(self, adjusted: float | None) -> str:
        """The verdict, judged on the Holm-adjusted p (``adjusted``) and the direction of the mean."""
        if self.kind == "not run":
            return "not run"
        if self.kind == "one seed":
            # one seed has no interval, so it can neither hold nor contradict a claim: the sign is shown, not judged
            side = "the claimed direction" if self.sign * self.raw > 0 else "not the claimed direction"
            return f"not resolved (one seed, no interval; difference {self.raw:+.4g}, {side})"
        if self.kind == "identical":  # e.g. a method that reduces to its baseline: no spread, so no interval
            return f"no difference (identical in all {len(self.diffs)} paired seeds)"
        mean, half, n = ci95(self.diffs)
        _, sd, _ = _stats(self.diffs)
        ps = f"p {self.p:.2g}, Holm {adjusted:.2g}, sign-flip {self.perm_p:.2g}"
        detail = f"difference {mean:+.4g}, 95% CI [{mean - half:+.4g}, {mean + half:+.4g}], {n} paired seeds; {ps}"
        if adjusted is not None and adjusted < ALPHA:
            return f"**{'held' if self.sign * mean > 0 else 'contradicted'}** ({detail})"
        after = "; the CI excludes 0 but Holm's p does not survive" if self.p < ALPHA else ""
        return (f"not resolved ({detail}{after}; CI half-width ±{half:.2g}, minimum detectable effect at 80% power "
                f"±{mde(sd, n, ALPHA, 0.8):.2g})")


def paired_test(method: dict[int, float], baseline: dict[int, float], higher_is_better: bool = True) -> PairedTest:
    """The paired comparison of ``method − baseline`` from per-seed values (paired on the seeds both have)."""
    sign = 1.0 if higher_is_better else -1.0
    if not method or not baseline:
        return PairedTest("not run", sign)
    seeds = sorted(set(method) & set(baseline))
    if len(seeds) < 2:
        raw = sum(method.values()) / len(method) - sum(baseline.values()) / len(baseline)
        return PairedTest("one seed", sign, raw=raw)
    diffs = [method[s] - baseline[s] for s in seeds]
    if all(d == 0 for d in diffs):
        return PairedTest("identical", sign, diffs, p=1.0, perm_p=1.0)
    return PairedTest("t", sign, diffs, p=paired_t_p(diffs), perm_p=sign_flip_p(diffs))


def holm_adjusted(tests: list[PairedTest]) -> list[float | None]:
    """Holm's adjustment over one family of tests (those with a p-value; None for the others)."""
    tested = [i for i, t in enumerate(tests) if t.p is not None]
    adjusted = dict(zip(tested, holm([tests[i].p for i in tested])))
    return [adjusted.get(i) for i in range(len(tests))]


def _higher_is_better(claim: dict) -> bool:
    if "higher_is_better" in claim:
        return bool(claim["higher_is_better"])
    return next((m[3] for m in METRICS if m[0] == claim["metric"] and m[3] is not None), True)


def claim_test(results: list[RunResult], claim: dict, chosen: dict[str, str] | None = None) -> PairedTest:
    m, b, metric = claim["method"], claim["baseline"], claim["metric"]
    if "point" in claim:  # a claim at one fixed sweep point, the same in every view
        chosen = {m: point_label(claim["point"]), b: point_label(claim["point"])}
    pm = chosen.get(m, "") if chosen else ""
    pb = chosen.get(b, "") if chosen else ""
    return paired_test(per_seed(results, m, pm, metric), per_seed(results, b, pb, metric), _higher_is_better(claim))


def _comparison(claim: dict, chosen: dict[str, str] | None) -> tuple:
    c = chosen or {}
    if "point" in claim:
        c = {claim["method"]: point_label(claim["point"]), claim["baseline"]: point_label(claim["point"])}
    return claim["method"], c.get(claim["method"], ""), claim["baseline"], c.get(claim["baseline"], ""), claim["metric"]


def section_verdicts(results: list[RunResult], claims: list[dict], views: list[dict[str, str] | None]
                     ) -> list[list[str]]:
    """Every claim's verdict in every view (a view: the point each method is compared at). The family Holm
    adjusts over is the section's distinct comparisons (method and baseline at their points, metric): a claim
    whose points are the same in two views is one test, not two."""
    distinct: dict[tuple, PairedTest] = {}
    for chosen in views:
        for c in claims:
            distinct.setdefault(_comparison(c, chosen), claim_test(results, c, chosen))
    adjusted = dict(zip(distinct, holm_adjusted(list(distinct.values()))))
    return [[distinct[_comparison(c, chosen)].text(adjusted[_comparison(c, chosen)]) for c in claims]
            for chosen in views]


def family_size(results: list[RunResult], claims: list[dict], views: list[dict[str, str] | None]) -> int:
    keys = {_comparison(c, chosen) for chosen in views for c in claims}
    return sum(1 for k in keys if claim_test(results, {"method": k[0], "baseline": k[2], "metric": k[4]},
                                             {k[0]: k[1], k[2]: k[3]}).p is not None)


def _restrict(bench: BenchConfig, method: str, point: dict) -> str:
    return point_label({k: v for k, v in point.items() if k not in bench.methods.get(method, {})})


def shared_points(bench: BenchConfig, results: list[RunResult]) -> tuple[dict[str, str], str]:
    """Every method at the selection baseline's best validation point (its mean over seeds)."""
    methods = list(dict.fromkeys(r.method for r in results))
    if not bench.sweep:
        return dict.fromkeys(methods, ""), ""
    base = bench.select_baseline or next(m for m in bench.methods if not bench.methods[m].get("sft_only"))
    best, best_val = bench.points()[0], -math.inf
    for point in bench.points():
        v = _mean_val_accuracy(results, base, _restrict(bench, base, point))
        if v > best_val:
            best, best_val = point, v
    chosen = {m: ("" if bench.methods.get(m, {}).get("sft_only") else _restrict(bench, m, best)) for m in methods}
    return chosen, point_label(best)


def own_best_points(bench: BenchConfig, results: list[RunResult]) -> dict[str, str]:
    """Every method at its own best validation point (mean over seeds); ties go to the earlier point in the
    config (points only in the runs, after them)."""
    chosen: dict[str, str] = {}
    for m in dict.fromkeys(r.method for r in results):
        best, best_val = None, -math.inf
        order = {point_label(p): i for i, p in enumerate(bench.method_points(m))} if m in bench.methods else {}
        ran = dict.fromkeys(r.point for r in results if r.method == m)
        for point in sorted(ran, key=lambda p: order.get(p, len(order))):
            v = _mean_val_accuracy(results, m, point)
            if best is None or v > best_val:
                best, best_val = point, v
        chosen[m] = best or ""
    return chosen


def grid_edge(bench: BenchConfig, method: str, label: str) -> str:
    """" (grid edge: lowest learning_rate)" when the selected point's value of a swept key is the lowest or
    highest among the method's points that agree with it on every other key (so the grid does not bracket
    the optimum along that key); "" otherwise."""
    points = bench.method_points(method)
    point = next((p for p in points if point_label(p) == label), None)
    if point is None:
        return ""
    edges = []
    for key, value in point.items():
        line = [p[key] for p in points if all(p.get(k) == v for k, v in point.items() if k != key)]
        if len(set(line)) > 1 and value in (min(line), max(line)):
            edges.append(f"{'lowest' if value == min(line) else 'highest'} {key}")
    return f" (grid edge: {', '.join(edges)})" if edges else ""


def reused_runs(bench: BenchConfig, results: list[RunResult], results_dir: Path) -> dict[str, set]:
    """Section name → keys of this section's runs that are identical records (commit and timings included) of
    that section's runs.jsonl (config key ``reuses``): the same runs, so not independent evidence."""
    out = {}
    for name in bench.reuses:
        theirs = {json.dumps(r.to_dict(), sort_keys=True) for r in read_results(results_dir.parent / name)}
        out[name] = {r.key for r in results if json.dumps(r.to_dict(), sort_keys=True) in theirs}
    return out


def _reuse_mark(reused: dict[str, set], results: list[RunResult], claim: dict, chosen: dict[str, str] | None) -> str:
    if "point" in claim:
        chosen = {claim["method"]: point_label(claim["point"]), claim["baseline"]: point_label(claim["point"])}
    used = {(m, (chosen or {}).get(m, ""), r.seed) for m in (claim["method"], claim["baseline"]) for r in results
            if r.method == m and r.point == (chosen or {}).get(m, "")}
    parts = [f"{len(used & keys)} of its {len(used)} runs are section {name}'s" for name, keys in reused.items()
             if used & keys]
    return f" [reused runs: {'; '.join(parts)}]" if parts else ""


def _power_table(results: list[RunResult], claims: list[dict], views: list[dict[str, str]], effect: float
                 ) -> list[str]:
    """Seeds each claim needs for 80% power (two-sided paired t, α = 0.05) at ``effect``, from its paired SD."""
    lines = [f"Seeds for 80% power at an effect of {effect:g} (two-sided paired t, α = 0.05; docs/bench.md), "
             "from each comparison's paired SD over the seeds run so far:", "",
             "| claim | view | paired seeds | paired SD | seeds needed |", "|---|---|---:|---:|---:|"]
    for c in claims:
        for name, chosen in zip(("shared point", "own best point"), views):
            t = claim_test(results, c, chosen)
            if t.kind == "t":
                sd = _stats(t.diffs)[1]
                lines.append(f"| {c['text']} | {name} | {len(t.diffs)} | {sd:.3g} | {seeds_for_power(sd, effect)} |")
    return lines + [""]


_OUTPUTS = ("benchmarks/results", "benchmarks/RESULTS.md", "README.md")


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # the bench's own outputs (results, RESULTS.md, README's generated block) are tracked: a resumed grid has
        # written them, and they do not change what a run computes
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                *(f":(top,exclude){p}" for p in _OUTPUTS)], capture_output=True, text=True).stdout
        return sha + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {dev}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def _plots(bench: BenchConfig, summary: dict, results_dir: Path, chosen: dict[str, str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    styles = {m: (plt.cm.tab20(i % 20), "os^Dv<>pPX*h"[i % 12]) for i, m in enumerate(summary)}
    if any("accuracy" in s and "kl" in s for s in summary.values()):
        # left: every method incl. the starting model; right: zoom on the trained methods
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, zoom in zip(axes, (False, True)):
            for method, s in summary.items():
                if "accuracy" not in s or "kl" not in s or (zoom and s["kl"][0] == 0.0):
                    continue
                color, marker = styles[method]
                ax.errorbar(s["kl"][0], 100 * s["accuracy"][0], xerr=s["kl"][1], yerr=100 * s["accuracy"][1],
                            fmt=marker, color=color, capsize=3, label=method)
            ax.set_xlabel("KL(π‖π_ref) on held-out prompts (nats / response)")
            ax.set_ylabel("held-out answer accuracy (%)")
        axes[0].set_title(bench.title, fontsize=9)
        axes[1].set_title("trained methods (zoom), mean ± std over seeds"
                          + (" (shared sweep point)" if bench.sweep else ""), fontsize=9)
        axes[0].legend(fontsize=7, ncol=2)
        name = "accuracy_vs_kl.png"
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        methods = [m for m, s in summary.items() if "reward_accuracy" in s]
        ax.bar(methods, [100 * summary[m]["reward_accuracy"][0] for m in methods],
               yerr=[100 * summary[m]["reward_accuracy"][1] for m in methods], capsize=3,
               color=[styles[m][0] for m in methods])
        ax.set_ylabel("held-out implicit-reward accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
        ax.set_title(bench.title, fontsize=9)
        name = "reward_accuracy.png"
    fig.tight_layout()
    fig.savefig(results_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)

    traj_methods = [m for m in bench.trajectory_methods if m in summary]
    files = {m: [results_dir / "trajectories" / slug(m) / trajectory_name(chosen.get(m, ""), seed)
                 for seed in bench.seeds] for m in traj_methods}
    files = {m: [f for f in fs if f.is_file()] for m, fs in files.items()}
    if traj_methods and not all(files.values()) and (results_dir / "chosen_trajectories.png").is_file():
        names.append("chosen_trajectories.png")  # some runs' trajectories predate their keeping: keep the plot
    elif traj_methods:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for method in traj_methods:
            for i, f in enumerate(files[method]):
                pts = json.loads(f.read_text())
                if pts:
                    steps, vals = zip(*pts)
                    ax.plot(steps, vals, color=f"C{traj_methods.index(method)}", alpha=0.8,
                            label=method if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("Δ log π(chosen), summed over tokens,\nmean over the probe pairs")
        ax.set_title("chosen log-prob trajectories (one line per seed)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results_dir / "chosen_trajectories.png", dpi=110)
        plt.close(fig)
        names.append("chosen_trajectories.png")
    return names


def append_run(results_dir: Path, result: RunResult | None, *, rewrite: list[RunResult] | None = None) -> None:
    """runs.jsonl: one JSON line per finished run (``rewrite`` replaces the file's runs first)."""
    path = results_dir / "runs.jsonl"
    if rewrite is not None:
        path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rewrite))
    if result is not None:
        with path.open("a") as f:
            f.write(json.dumps(result.to_dict()) + "\n")


def read_results(results_dir: Path) -> list[RunResult]:
    """RunResults back from runs.jsonl; [] when there is none."""
    fields = set(RunResult.__dataclass_fields__)
    runs = results_dir / "runs.jsonl"
    if not runs.is_file():
        return []
    return [RunResult(**{k: v for k, v in json.loads(line).items() if k in fields})
            for line in runs.read_text().splitlines() if line.strip()]


def provenance(bench: BenchConfig) -> dict:
    """Commit, machine, date and config file hash of a bench run, recorded when it runs: a redrawn report keeps
    them, so a later edit of the config (one that changes no run) leaves the report as it was."""
    return {"commit": _git_commit(), "machine": machine(),
            "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}",
            "config_sha256": hashlib.sha256(Path(bench.source).read_bytes() if bench.source else b"").hexdigest()}


def _metrics_table(summary: dict, cols: list, chosen: dict[str, str] | None,
                   edges: dict[str, str] | None = None) -> list[str]:
    point_col = chosen is not None
    lines = ["| method | " + ("point | " if point_col else "") + " | ".join(c[1] for c in cols) + " | train s |",
             "|---|" + ("---|" if point_col else "") + "---:|" * (len(cols) + 1)]
    for method, s in summary.items():
        cells = [_fmt(s.get(c[0]), c[2]) for c in cols]
        train_s = f"{s['train_seconds'][0]:.0f}" if "train_seconds" in s else "–"
        where = f"{chosen.get(method) or '–'}{(edges or {}).get(method, '')} | " if point_col else ""
        lines.append(f"| {method} | {where}" + " | ".join(cells) + f" | {train_s} |")
    return lines


def _sweep_table(bench: BenchConfig, results: list[RunResult], metric: str, title: str) -> list[str]:
    points = [point_label(p) for p in bench.points()]
    lines = [f"{title}:", "", "| method | " + " | ".join(points) + " |", "|---|" + "---:|" * len(points)]
    for method in dict.fromkeys(r.method for r in results):
        if bench.methods.get(method, {}).get("sft_only"):
            continue
        cells = []
        for p in bench.points():
            vals = list(per_seed(results, method, _restrict(bench, method, p), metric).values())
            if vals:
                mean, half, n = ci95(vals)
                cells.append(f"{100 * mean:.1f}" + (f" ± {100 * half:.1f} (n={n})" if n > 1 else " (n=1)"))
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(bench: BenchConfig, setup: Setup, results: list[RunResult], results_dir: Path,
                 *, wall_seconds: float, prov: dict) -> Path:
    """section.md, results.csv and plots of one section, then RESULTS.md and README's verdicts."""
    with (results_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RunResult.__dataclass_fields__))
        w.writeheader()
        for r in results:
            w.writerow(r.to_dict())
    shared, shared_label = shared_points(bench, results)
    summary = summarize(results, shared)
    cols = [m for m in METRICS if any(m[0] in s for s in summary.values())]
    reused = reused_runs(bench, results, results_dir)
    lines = _header(bench, setup, results, reused, wall_seconds=wall_seconds, prov=prov)
    if bench.sweep:
        base = bench.select_baseline or next(m for m in bench.methods if not bench.methods[m].get("sft_only"))
        lines += [f"### Every method at one shared point: {shared_label}"
                  f"{grid_edge(bench, base, shared.get(base, ''))} (best validation accuracy of "
                  f"{bench.select_baseline or 'the first method'})", ""]

    def edges(chosen: dict[str, str]) -> dict[str, str]:
        return {m: grid_edge(bench, m, p) for m, p in chosen.items() if m in bench.methods}

    lines += _metrics_table(summary, cols, shared if bench.sweep else None, edges(shared))
    lines += ["", "mean ± std over seeds. " + bench.metric_note, ""]
    own = own_best_points(bench, results) if bench.sweep else None
    if own is not None:
        lines += ["### Every method at its own best validation point", ""]
        lines += _metrics_table(summarize(results, own), cols, own, edges(own))
        lines += [""]
        lines += _sweep_table(bench, results, "val_accuracy", "Validation accuracy (%) by sweep point, mean ± 95% CI "
                              "half-width (this selects the points)")
        if any(r.accuracy is not None for r in results):
            lines += _sweep_table(bench, results, "accuracy", "Held-out test accuracy (%) by sweep point, mean ± "
                                  "95% CI half-width (reported, never used to select)")
    if bench.claims:
        lines += _claim_lines(bench, results, reused, [shared, own] if own is not None else [shared])
    for name in _plots(bench, summary, results_dir, shared):
        lines.append(f"![{name}](results/{results_dir.name}/{name})")
    lines.append("")
    section = results_dir / "section.md"
    section.write_text("\n".join(lines) + "\n")
    regenerate_results_md(results_dir.parent)
    if bench.source:
        regenerate_readme_block(Path(bench.source).resolve().parent, results_dir.parent)
    return section


def _header(bench: BenchConfig, setup: Setup, results: list[RunResult], reused: dict, *, wall_seconds: float,
            prov: dict) -> list[str]:
    """The section's title and provenance: command, commits, config hash, seeds, machine, sweep, notes, reuse."""
    commits = list(dict.fromkeys(r.commit for r in results if r.commit))
    lines = [f"## {bench.title}", ""]
    lines += [
        f"- command: `prefkit bench {bench.source}`; commit {prov['commit']}"
        + (f" (runs at {', '.join(commits)})" if commits and commits != [prov["commit"]] else "")
        + f"; config sha256 {prov['config_sha256'][:12]}",
        f"- seeds: {bench.seeds} (method training seed: data order and initialisation of anything random; "
        "the starting model and the pairs are shared)",
        f"- machine: {prov['machine']}; wall time {wall_seconds / 60:.1f} min; {prov['date']}",
    ]
    if bench.sweep:
        n_planned = sum(len(bench.method_points(m)) * (1 if o.get("sft_only") else len(bench.seeds))
                        for m, o in bench.methods.items() if not o.get("sft_only"))
        n_done = sum(1 for r in results if not bench.methods.get(r.method, {}).get("sft_only"))
        lines.append(f"- sweep: {bench.sweep}; {n_done} of {n_planned} planned runs done; points are picked "
                     "on validation accuracy only (mean over seeds), never on test")
    lines += [f"- {n}" for n in setup.notes]
    for name, keys in reused.items():
        which = sorted({f"{m} at {p or 'its point'}" for m, p, _ in keys})
        lines.append(f"- reused runs: {len(keys)} of these {len(results)} runs are identical records of section "
                     f"{name}'s runs.jsonl ({'; '.join(which)}): verdicts that use them are not independent of "
                     f"section {name}'s")
    lines.append("")
    return lines


def _claim_lines(bench: BenchConfig, results: list[RunResult], reused: dict, points: list[dict]) -> list[str]:
    """The claims table (one verdict column per view), how verdicts are judged, and the power table."""
    if len(points) == 1:
        lines = ["| claim | method vs baseline | metric | verdict |", "|---|---|---|---|"]
    else:
        lines = ["| claim | method vs baseline | metric | at the shared point | each at its own best point |",
                 "|---|---|---|---|---|"]
    views = section_verdicts(results, bench.claims, points)
    for i, c in enumerate(bench.claims):
        cells = [v[i] + _reuse_mark(reused, results, c, chosen) for v, chosen in zip(views, points)]
        lines.append(f"| {c['text']} | {c['method']} vs {c['baseline']} | {c['metric']} | " + " | ".join(cells) + " |")
    lines += ["", f"Verdicts (docs/bench.md): per-seed paired differences; p = two-sided paired t-test, Holm = "
              f"Holm-adjusted over this section's {family_size(results, bench.claims, points)} distinct comparisons "
              "(a claim at the same points in both views counts once), sign-flip = "
              "permutation test over the 2^n sign patterns (exact up to 16 seeds; no normality; it cannot go "
              "below 2/2^n). held / "
              "contradicted only when Holm's p < 0.05, else not resolved with the CI half-width and the minimum "
              "detectable effect at 80% power (no difference when every seed's difference is 0).",
              ""]
    if bench.power_effect:
        lines += _power_table(results, bench.claims, points, bench.power_effect)
    return lines


def regenerate_readme_block(config_dir: Path, results_root: Path) -> bool:
    """The repository's README (beside the configs' folder, found from the config, not the working directory)
    gets the verdict block, when the results went to the configs' own results folder."""
    if (config_dir / "results").resolve() != results_root.resolve():
        return False
    return update_readme(config_dir.parent / "README.md", verdict_block(config_dir, results_root))


README_START = "<!-- bench verdicts: generated by `prefkit bench CONFIG --report_only`; do not edit by hand -->"
README_END = "<!-- end of bench verdicts -->"


def _short(test: PairedTest, adjusted: float | None, pct: bool) -> str:
    verdict = test.text(adjusted).split(" (")[0]
    if test.kind != "t":
        return verdict
    mean, half, n = ci95(test.diffs)
    scale, unit = (100.0, " points") if pct else (1.0, "")
    return (f"{verdict}: {scale * mean:+.3g}{unit}, 95% CI [{scale * (mean - half):+.3g}, {scale * (mean + half):+.3g}], "
            f"{n} seeds; p {test.p:.2g}, Holm {adjusted:.2g}, sign-flip {test.perm_p:.2g}")


def verdict_rows(bench: BenchConfig, results: list[RunResult], reused: dict[str, set]) -> list[str]:
    """README rows of one section: every claim in each view (one row when both views compare the same points)."""
    shared, _ = shared_points(bench, results)
    views = [("shared point", shared)] + ([("own best point", own_best_points(bench, results))] if bench.sweep else [])
    distinct: dict[tuple, PairedTest] = {}
    for _, chosen in views:
        for c in bench.claims:
            distinct.setdefault(_comparison(c, chosen), claim_test(results, c, chosen))
    adjusted = dict(zip(distinct, holm_adjusted(list(distinct.values()))))
    section = bench.title.split(" ")[0].rstrip(".")
    rows = []
    for c in bench.claims:
        keys = list(dict.fromkeys(_comparison(c, chosen) for _, chosen in views))
        pct = next((m[2] for m in METRICS if m[0] == c["metric"]), False)
        for name, chosen in views:
            key = _comparison(c, chosen)
            if key not in keys:
                continue
            keys.remove(key)
            if distinct[key].kind == "not run":  # a grid still under way: nothing to say yet
                continue
            view = "both views" if len(views) > 1 and not keys and name == views[0][0] else name
            where = f"{view}: {key[1]} vs {key[3]}" if bench.sweep else "–"
            mark = _reuse_mark(reused, results, c, chosen)
            rows.append(f"| {section} | {c['text']} | {where} | {_short(distinct[key], adjusted[key], pct)}{mark} |")
    return rows


def verdict_block(config_dir: Path, results_root: Path) -> str:
    """README's verdict table, from every config in ``config_dir`` with claims and runs in ``results_root``."""
    from prefkit.bench.config import load_bench_config

    benches = [load_bench_config(str(p)) for p in sorted(config_dir.glob("bench_*.yaml"))]
    lines = [README_START, "", "| section | claim | compared at | verdict (Holm within the section) |",
             "|---|---|---|---|"]
    for bench in sorted(benches, key=lambda b: b.title):
        results = read_results(results_root / bench.name)
        if bench.claims and results:
            order = list(bench.methods)
            results = sorted(results, key=lambda r: (order.index(r.method) if r.method in order else len(order),
                                                     r.point, r.seed))
            lines += verdict_rows(bench, results, reused_runs(bench, results, results_root / bench.name))
    return "\n".join(lines + ["", README_END])


def update_readme(readme: Path, block: str) -> bool:
    """Replace README's marked block with ``block``; False (and nothing written) when it has no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + block + tail)
    return True


RESULTS_HEADER = """# prefkit bench results

Regenerated by `prefkit bench benchmarks/<config>.yaml` (each run rewrites its own section under
`benchmarks/results/<name>/` and then this file). Every method that was run is reported; nothing was tuned on
held-out data. Column meanings: docs/bench.md.
"""


def regenerate_results_md(results_root: Path) -> Path:
    sections = sorted(results_root.glob("*/section.md"), key=lambda p: p.read_text().splitlines()[0])
    out = results_root.parent / "RESULTS.md"  # benchmarks/results/<name> → benchmarks/RESULTS.md
    out.write_text(RESULTS_HEADER + "\n" + "\n".join(p.read_text() for p in sections))
    return out
