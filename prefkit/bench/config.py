"""`prefkit bench` configs: one YAML file per comparison (see benchmarks/*.yaml and docs/bench.md).

    name: arithmetic              # results go to benchmarks/results/<name>/ (runs to benchmarks/out/bench/<name>/)
    title: "A. Verifiable arithmetic task"
    task: arithmetic              # arithmetic | preference (held-out pairs) | gsm8k (exact-match answers)
    task_options: {...}           # task-specific sizes (documented per task in docs/bench.md)
    seeds: [0, 1, 2]
    train: {...}                  # prefkit train options shared by all methods
    sweep:                        # optional: a grid of train options; every method runs at every point
      learning_rate: [1.0e-5, 3.0e-5, 1.0e-4]   # (a method's own value of a swept key wins)
    # or an explicit list of points (same keys in each), e.g. lr·β held fixed across β:
    #   sweep: [{beta: 0.1, learning_rate: 1.0e-5}, {beta: 1.0, learning_rate: 1.0e-6}]
    reuses: [arithmetic]          # optional: sections some of whose runs.jsonl records were copied here
    power_effect: 0.01            # optional: the report gives the seeds a claim needs for 80% power at it
    select_baseline: DPO          # with a sweep: the method whose best validation point is the shared one
    methods:                      # name: option overrides (ordered; every method is run and reported)
      SFT only: {sft_only: true}
      DPO: {loss_type: sigmoid}
      cADPO: {critical_tokens: true, granularity: adaptive, num_segments: 256}
      DPO+RC α=1: {reward_calibration: true, rc_fixed_alpha: 1.0}  # a control: RC's machinery, α held at 1
      cADPO flat: {critical_tokens: true, token_weights: flat_rejected, granularity: adaptive, num_segments: 256}
    claims:                       # a claim is judged at each view's points, or at one fixed sweep point
      - {text: "...", method: cADPO, baseline: DPO, metric: accuracy}
      - {text: "...", method: cADPO, baseline: DPO, metric: accuracy, point: {learning_rate: 1.0e-4}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefkit.configfile import read_yaml_mapping
from prefkit.errors import ConfigError

TASKS = ("arithmetic", "preference", "gsm8k")
# method keys that are not prefkit train options
BENCH_KEYS = ("sft_only", "critical_tokens", "token_weights")
# token_weights (with critical_tokens): "critical" = the critical-token weights as written; "flat_rejected" =
# chosen weights 1 and every rejected token weighted by its response's mean weight (the cADPO control)
TOKEN_WEIGHTS = ("critical", "flat_rejected")


@dataclass
class BenchConfig:
    name: str
    title: str
    task: str
    seeds: list[int]
    train: dict
    methods: dict[str, dict]
    task_options: dict = field(default_factory=dict)
    claims: list[dict] = field(default_factory=list)
    trajectory_methods: list[str] = field(default_factory=list)
    metric_note: str = ""
    source: str = ""
    sweep: dict[str, list] | list[dict] = field(default_factory=dict)
    select_baseline: str | None = None
    reuses: list[str] = field(default_factory=list)
    power_effect: float | None = None  # report: seeds for 80% power at this effect, from the paired SDs

    def points(self) -> list[dict]:
        """The sweep's points ({} alone without a sweep), in config order: the grid of a mapping, or the list."""
        if isinstance(self.sweep, list):
            return [dict(p) for p in self.sweep]
        grid: list[dict] = [{}]
        for key, values in self.sweep.items():
            grid = [{**g, key: v} for g in grid for v in values]
        return grid

    def method_points(self, method: str) -> list[dict]:
        """The points a method runs at: its own value of a swept key wins, so duplicates collapse."""
        own = self.methods[method]
        out: list[dict] = []
        for point in self.points():
            kept = {k: v for k, v in point.items() if k not in own}
            if kept not in out:
                out.append(kept)
        return out

    def uses_critical_tokens(self) -> bool:
        return any(m.get("critical_tokens") for m in self.methods.values())


def load_bench_config(path: str) -> BenchConfig:
    """Parse and check a bench YAML, naming the file and key of any problem."""
    p = Path(path)
    raw = read_yaml_mapping(path, "bench config")
    allowed = {"name", "title", "task", "task_options", "seeds", "train", "methods", "claims",
               "trajectory_methods", "metric_note", "sweep", "select_baseline", "reuses", "power_effect"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "task", "methods"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    if raw["task"] not in TASKS:
        raise ConfigError(f"{path}: task: must be one of {', '.join(TASKS)}, got {raw['task']!r}")
    methods = _checked_methods(path, raw["methods"])
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds: must be a non-empty list of integers")
    sweep = _checked_sweep(path, raw.get("sweep") or {})
    reuses = raw.get("reuses") or []
    if not isinstance(reuses, list) or not all(isinstance(r, str) for r in reuses):
        raise ConfigError(f"{path}: reuses: must be a list of section names (benchmarks/results/<name>)")
    select_baseline = raw.get("select_baseline")
    if select_baseline is not None and select_baseline not in methods:
        raise ConfigError(f"{path}: select_baseline: {select_baseline!r} is not one of the methods")
    claims = _checked_claims(path, raw.get("claims") or [], methods)
    bench = BenchConfig(
        name=str(raw["name"]), title=str(raw.get("title", raw["name"])), task=raw["task"], seeds=seeds,
        train=dict(raw.get("train") or {}), methods={k: dict(v or {}) for k, v in methods.items()},
        task_options=dict(raw.get("task_options") or {}), claims=claims,
        trajectory_methods=list(raw.get("trajectory_methods") or []), metric_note=str(raw.get("metric_note", "")),
        source=str(p), sweep=[dict(q) for q in sweep] if isinstance(sweep, list) else {k: list(v) for k, v in sweep.items()},
        select_baseline=select_baseline, reuses=reuses,
        power_effect=float(raw["power_effect"]) if raw.get("power_effect") is not None else None,
    )
    for i, c in enumerate(claims):
        if "point" in c:
            match = [q for q in bench.points() if q == dict(c["point"])]
            if not match:
                raise ConfigError(f"{path}: claims[{i}].point: {c['point']} is not a point of the sweep")
            c["point"] = match[0]  # in the sweep's key order, so its label is the runs' point label
    _check_runs(path, bench)
    return bench


def _checked_methods(path: str, methods) -> dict:
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: methods: must be a non-empty mapping of name: {{options}}")
    for name, opts in methods.items():
        if opts is not None and not isinstance(opts, dict):
            raise ConfigError(f"{path}: methods.{name}: must be a mapping of options")
        tw = (opts or {}).get("token_weights")
        if tw is not None and (tw not in TOKEN_WEIGHTS or not opts.get("critical_tokens")):
            raise ConfigError(f"{path}: methods.{name}.token_weights: must be one of {', '.join(TOKEN_WEIGHTS)}, "
                              "with critical_tokens: true")
    return methods


def _checked_sweep(path: str, sweep) -> dict | list:
    if isinstance(sweep, list):
        if not all(isinstance(q, dict) and q and set(q) == set(sweep[0]) for q in sweep):
            raise ConfigError(f"{path}: sweep: a list of points must hold mappings of train option: value, "
                              "every one with the same keys")
    elif not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise ConfigError(f"{path}: sweep: must be a mapping of train option: [values, ...] or a list of points")
    return sweep


def _checked_claims(path: str, claims: list, methods: dict) -> list:
    for i, c in enumerate(claims):
        missing = [k for k in ("text", "method", "baseline", "metric") if not isinstance(c, dict) or k not in c]
        if missing:
            raise ConfigError(f"{path}: claims[{i}]: missing {missing}")
        for k in ("method", "baseline"):
            if c[k] not in methods:
                raise ConfigError(f"{path}: claims[{i}].{k}: {c[k]!r} is not one of the methods")
        if "point" in c and not isinstance(c["point"], dict):
            raise ConfigError(f"{path}: claims[{i}].point: must be a mapping of swept option: value")
    return claims


def run_options(bench: BenchConfig, method: str, point: dict | None = None) -> dict:
    """The train options of ``method`` at sweep ``point`` (the method's own values win), without the bench keys
    and the per-run ones (model, data files, output, seed)."""
    opts = bench.methods[method]
    options = {**bench.train, **(point or {}), **{k: v for k, v in opts.items() if k not in BENCH_KEYS}}
    if opts.get("critical_tokens"):
        options["use_token_weights"] = True
    return options


def _check_runs(path: str, bench: BenchConfig) -> None:
    """Every planned run's options resolved as its training will resolve them, so a bad option stops the bench
    at load, naming the method, instead of after the set-up."""
    from prefkit.configfile import config_from_options
    from prefkit.spec import resolve_run

    for method, opts in bench.methods.items():
        if opts.get("sft_only"):
            continue
        for point in bench.method_points(method):
            try:
                resolve_run(config_from_options({**run_options(bench, method, point), "output_dir": "unused"}))
            except ConfigError as e:
                where = f" at {point}" if point else ""
                raise ConfigError(f"{path}: methods.{method}{where}: {e}") from e
