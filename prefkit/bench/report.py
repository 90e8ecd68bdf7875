"""Bench report: per-run CSV, per-method summary (mean ± std over seeds), claim verdicts, plots, and
``benchmarks/RESULTS.md`` regenerated from every section present.

A claim compares one method with a baseline on one metric. With n ≥ 2 seeds each, the verdict uses the
difference of means d and its standard error se = sqrt(s₁²/n₁ + s₂²/n₂): *held* if d > 2·se in the claimed
direction, *reversed* if d < −2·se, otherwise *not resolved* (within seed noise). With one seed the report
states the direction only.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import math
import os
import platform
import subprocess
from pathlib import Path

from prefkit.bench.config import BenchConfig
from prefkit.bench.runner import RunResult
from prefkit.bench.tasks import Setup

METRICS = [  # (field, column title, percent?, higher is better?)
    ("accuracy", "answer acc.", True, True),
    ("kl", "KL to ref", False, False),
    ("gen_length", "gen. length", False, None),
    ("d_logp_chosen", "Δ logp chosen", False, True),
    ("d_logp_rejected", "Δ logp rejected", False, False),
    ("reward_accuracy", "reward acc.", True, True),
    ("reward_margin", "margin", False, True),
    ("in_band", "in band", True, True),
]


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def summarize(results: list[RunResult]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method → metric → (mean, std, n) over seeds, for metrics the runs have."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for r in results:
        out.setdefault(r.method, {})
    for method in out:
        runs = [r for r in results if r.method == method]
        for field, *_ in METRICS + [("train_seconds", "", False, None)]:
            vals = [getattr(r, field) for r in runs if getattr(r, field) is not None]
            if vals:
                out[method][field] = _stats(vals)
    return out


def _fmt(stat: tuple[float, float, int] | None, pct: bool) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    scale = 100.0 if pct else 1.0
    digits = 1 if pct else 3
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def claim_verdict(summary: dict, claim: dict) -> str:
    m, b, metric = claim["method"], claim["baseline"], claim["metric"]
    if m not in summary or b not in summary or metric not in summary[m] or metric not in summary[b]:
        return "not run"
    (m1, s1, n1), (m2, s2, n2) = summary[m][metric], summary[b][metric]
    sign = 1.0 if claim.get("higher_is_better", True) else -1.0
    d = sign * (m1 - m2)
    if n1 < 2 or n2 < 2:
        return f"{'in the claimed direction' if d > 0 else 'not in the claimed direction'} (one seed: no error bar)"
    se = math.sqrt(s1**2 / n1 + s2**2 / n2)
    detail = f"difference {sign * d:+.4g}, 2·se {2 * se:.2g}"
    if d > 2 * se:
        return f"**held** ({detail})"
    if d < -2 * se:
        return f"**reversed** ({detail})"
    return f"not resolved ({detail})"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return sha + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {dev}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def _plots(bench: BenchConfig, summary: dict, results_dir: Path) -> list[str]:
    import json

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
        axes[1].set_title("trained methods (zoom), mean ± std over seeds", fontsize=9)
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
    files = {m: sorted((results_dir / "trajectories" / _slug(m)).glob("seed*.json")) for m in traj_methods}
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


def _slug(name: str) -> str:
    from prefkit.bench.runner import _slug as slug

    return slug(name)


def read_results(results_dir: Path) -> list[RunResult]:
    """RunResults back from results.csv (``prefkit bench --report_only`` redraws without retraining)."""
    out = []
    with (results_dir / "results.csv").open() as f:
        for row in csv.DictReader(f):
            vals = {k: (None if v == "" else float(v)) for k, v in row.items() if k not in ("method", "seed")}
            out.append(RunResult(method=row["method"], seed=int(row["seed"]), **vals))
    return out


def provenance() -> dict:
    """Commit, machine and date of a bench run, recorded when it runs (a redrawn report keeps them)."""
    return {"commit": _git_commit(), "machine": machine(),
            "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"}


def write_report(bench: BenchConfig, setup: Setup, results: list[RunResult], results_dir: Path,
                 *, wall_seconds: float, prov: dict) -> Path:
    summary = summarize(results)
    with (results_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RunResult.__dataclass_fields__))
        w.writeheader()
        for r in results:
            w.writerow(r.to_dict())
    cols = [m for m in METRICS if any(m[0] in s for s in summary.values())]
    lines = [f"## {bench.title}", ""]
    cfg_text = Path(bench.source).read_bytes() if bench.source else b""
    lines += [
        f"- command: `prefkit bench {bench.source}`; commit {prov['commit']}; config sha256 "
        f"{hashlib.sha256(cfg_text).hexdigest()[:12]}",
        f"- seeds: {bench.seeds} (method training seed: data order and initialisation of anything random; "
        "the starting model and the pairs are shared)",
        f"- machine: {prov['machine']}; wall time {wall_seconds / 60:.1f} min; {prov['date']}",
    ]
    lines += [f"- {n}" for n in setup.notes]
    lines += ["", "| method | " + " | ".join(c[1] for c in cols) + " | train s |",
              "|---|" + "---:|" * (len(cols) + 1)]
    for method, s in summary.items():
        cells = [_fmt(s.get(c[0]), c[2]) for c in cols]
        train_s = f"{s['train_seconds'][0]:.0f}" if "train_seconds" in s else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {train_s} |")
    lines += ["", "mean ± std over seeds. " + bench.metric_note, ""]
    if bench.claims:
        lines += ["| claim | method vs baseline | metric | verdict |", "|---|---|---|---|"]
        for c in bench.claims:
            lines.append(f"| {c['text']} | {c['method']} vs {c['baseline']} | {c['metric']} | "
                         f"{claim_verdict(summary, c)} |")
        lines.append("")
    for name in _plots(bench, summary, results_dir):
        lines.append(f"![{name}](results/{results_dir.name}/{name})")
    lines.append("")
    section = results_dir / "section.md"
    section.write_text("\n".join(lines) + "\n")
    regenerate_results_md(results_dir.parent)
    return section


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
