"""`prefkit plot`: PNGs of training curves and preference dynamics, several runs overlaid."""

from __future__ import annotations

import logging
from pathlib import Path

from prefkit.errors import PrefkitError
from prefkit.files import read_jsonl_tolerant
from prefkit.metric_names import with_current_names

logger = logging.getLogger("prefkit")

# (file name, title, y label, [metric keys], log scale)
PANELS = [
    ("loss.png", "training loss", "loss", ["loss"], False),
    ("margins.png", "implicit-reward margin", "β·h", ["rewards/margins"], False),
    ("logps.png", "log-prob of chosen / rejected (batch)", "summed log-prob", ["logps/chosen", "logps/rejected"], False),
    ("probe_logps.png", "probe batch: change of log-prob since start", "Δ summed log-prob",
     ["logps/chosen_delta", "logps/rejected_delta"], False),
    ("incentive_band.png", "incentive ratio d_w/d_l and the disentanglement band", "d_w / d_l",
     ["incentive/ratio", "band/lower", "band/upper"], True),
    ("in_band.png", "fraction in the disentanglement band", "fraction", ["band/in_band"], False),
    ("rc_alpha.png", "reward calibration α", "α", ["rc/alpha"], True),
]


def read_metrics(run_dir: str) -> list[dict]:
    """The run's logged records, renamed metrics under their current names (:mod:`prefkit.metric_names`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PrefkitError(f"{run_dir}: no metrics.jsonl (is this a prefkit output dir?)")
    return [with_current_names(r) for r in read_jsonl_tolerant(path)[0]]


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """Write one PNG per panel that has data; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name or d: read_metrics(d) for d in run_dirs}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for fname, title, ylabel, keys, log in PANELS:
        series = []
        for run, records in runs.items():
            for key in keys:
                pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
                if pts:
                    series.append((run, key, pts))
        if not series:
            logger.debug("plot %s skipped: no %s logged", fname, ", ".join(keys))
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for run, key, pts in series:
            style = "--" if key.startswith("band/") else "-"
            label = key if len(runs) == 1 else f"{run}: {key}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if log and all(v > 0 for _, _, pts in series for _, v in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = str(Path(out_dir) / fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
