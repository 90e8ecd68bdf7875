"""`prefkit bench CONFIG [--output_dir DIR] [--results_dir DIR] [--methods A,B]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefkit.bench.config import load_bench_config


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prefkit bench", description="Train a grid of methods x seeds and compare them.")
    p.add_argument("config", help="bench YAML (see benchmarks/*.yaml)")
    p.add_argument("--output_dir", default=None, help="runs and shared setup (default: out/bench/<name> beside the config)")
    p.add_argument("--results_dir", default=None,
                   help="report, CSV and plots (default: results/<name> beside the config; RESULTS.md goes one level up)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the config's methods")
    p.add_argument("--report_only", action="store_true", help="redraw the report of a finished run (no training)")
    args = p.parse_args(argv)
    bench = load_bench_config(args.config)
    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if only:
        unknown = [m for m in only if m not in bench.methods]
        if unknown:
            from prefkit.errors import ConfigError

            raise ConfigError(f"--methods: {unknown} not in {args.config}; methods: {list(bench.methods)}")
    from transformers.utils import logging as hf_logging

    from prefkit.bench.runner import report_only, run_bench

    hf_logging.disable_progress_bar()  # dozens of model loads; the bench prints one line per run instead
    os.environ.setdefault("TQDM_DISABLE", "1")

    beside = Path(args.config).resolve().parent  # benchmarks/bench_x.yaml → benchmarks/results/x, wherever run from
    work = Path(args.output_dir) if args.output_dir else beside / "out" / "bench" / bench.name
    results = Path(args.results_dir) if args.results_dir else beside / "results" / bench.name
    if args.report_only:
        report_only(bench, results)
    else:
        run_bench(bench, work, results, only=only)
    print(f"report: {results / 'section.md'} (and {results.parent.parent / 'RESULTS.md'})")
    return 0
