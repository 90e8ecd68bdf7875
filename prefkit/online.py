"""Semi-online training (`prefkit train --rounds R`, arXiv 2506.21495): every round samples pairs from the
current policy with prefkit.pairs' code, trains on them with the configured objective, and logs the round.

- Round r takes ``samples_per_round`` prompts, cycling through ``online_prompts`` in file order, and samples
  them with seed ``seed + 1000·r + rank``; ``--max_steps`` / ``--num_train_epochs`` apply to each round.
- The reference is the starting model (a LoRA run's adapters disabled, a frozen copy otherwise, or
  ``ref_model_name_or_path``) in every round. With ``--sync_ref_model`` it is updated at every round boundary
  instead of every ``ref_model_sync_steps`` steps: after round r, ref ← α·policy + (1 − α)·ref (TR-DPO's
  update, α = ``ref_model_mixup_alpha``; α = 1 makes it the policy at the start of each round). The updated
  reference is saved in ``round-<r>/reference.safetensors``, so a resumed run scores round r + 1 against it.
- A round ends with a checkpoint: ``round-<r>/`` holds its pairs, summary, metrics.jsonl, the policy
  (``from_pretrained``-loadable) and its trainable weights; ``round-<r>/ROUND_COMPLETE`` is written last.
  ``--resume_from_checkpoint latest`` restarts after the last complete round and gives the same pairs and
  curve as a run that was never stopped (each round's sampling and training are seeded and start from the
  saved weights; optimizer and schedule start afresh every round).
- Under ``accelerate launch`` every rank samples and scores a shard of the round's prompts; the pairs are
  gathered (``accelerate.utils.gather_object``) and every rank trains on all of them.

PrefTrainer knows nothing of rounds: each round is one ordinary PrefTrainer run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import SaveStrategy

from prefkit import accel
from prefkit.config import PrefConfig
from prefkit.data import load_rows, prepare_dataset
from prefkit.errors import ConfigError
from prefkit.layouts import Layout, resolve_layout
from prefkit.models import is_peft_model
from prefkit.pairs.pairing import PAIRINGS
from prefkit.pairs.pipeline import PairOptions, SampleOptions, Summary, make_pairs, write_outputs
from prefkit.pairs.sample import VLLM_GPU_MEMORY_UTILIZATION, check_backend, check_vllm_memory
from prefkit.pairs.scorers import build_scorer
from prefkit.reference import mix_into_reference, reference_copy
from prefkit.runsetup import (
    CONFIG_FILE,
    check_output_dir,
    check_same_run,
    load_model_and_tokenizer,
    load_reference_model,
    resolved_config_dict,
)
from prefkit.spec import RunSpec, resolve_run
from prefkit.trainer import PrefTrainer

logger = logging.getLogger("prefkit")

ROUND_MARKER = "ROUND_COMPLETE"
TRAINABLE_FILE = "policy_trainable.safetensors"
REFERENCE_FILE = "reference.safetensors"  # --sync_ref_model: the reference the next round scores against
ROUNDS_LOG = "rounds.jsonl"
VLLM_POLICY_DIR = "vllm-policy"  # --online_backend vllm: the round's starting policy, removed once sampled


@dataclass(frozen=True)
class OnlineSpec:
    """The semi-online options (PrefConfig's ``rounds`` and ``online_*`` fields), checked by :func:`resolve_online`."""

    rounds: int  # built only from a PrefConfig, so its defaults are PrefConfig's
    online_prompts: str
    online_scorer: str
    samples_per_round: int
    online_num_samples: int
    online_pairing: str
    online_reference_fallback: str | None
    online_max_new_tokens: int
    online_temperature: float
    online_reference_field: str
    online_prompt_field: str
    online_backend: str
    vllm_gpu_memory_utilization: float


_ONLINE_OPTIONS = [f.name for f in dataclasses.fields(OnlineSpec)]


def wants_rounds(cfg: PrefConfig) -> bool:
    return bool(cfg.rounds or cfg.online_prompts or cfg.online_scorer)


def check_no_online_options(cfg: PrefConfig) -> None:
    """A run without --rounds refuses the semi-online options it would ignore."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg))}
    for name in _ONLINE_OPTIONS:
        if getattr(cfg, name) != defaults[name]:
            raise ConfigError(f"--{name}: has no effect without --rounds; add --rounds N or drop this option")


def resolve_online(cfg: PrefConfig) -> OnlineSpec:
    """The semi-online options of a run, after every check (naming the option to change)."""

    def bad(option: str, msg: str) -> None:
        raise ConfigError(f"--{option}: {msg}")

    if cfg.rounds < 1:
        bad("rounds", f"must be at least 1 with --online_prompts/--online_scorer, got {cfg.rounds}")
    if not cfg.online_prompts:
        bad("online_prompts", "required with --rounds (a prompts file like `prefkit pairs --prompts`)")
    if not cfg.online_scorer:
        bad("online_scorer", "required with --rounds (math | regex:P | python:mod:fn | reward_model:PATH)")
    for option, low in (("samples_per_round", 1), ("online_max_new_tokens", 1)):
        if getattr(cfg, option) < low:
            bad(option, f"must be at least {low}, got {getattr(cfg, option)}")
    if cfg.online_num_samples < 2:
        bad("online_num_samples", f"pairs need at least 2 samples per prompt, got {cfg.online_num_samples}")
    if cfg.online_pairing not in PAIRINGS:
        bad("online_pairing", f"must be one of {', '.join(PAIRINGS)}, got {cfg.online_pairing!r}")
    if not (math.isfinite(cfg.online_temperature) and cfg.online_temperature >= 0):
        bad("online_temperature", f"must be a finite number >= 0, got {cfg.online_temperature}")
    if cfg.dataset_name:
        bad("dataset_name", "--rounds trains on pairs it samples itself; drop --dataset_name")
    if cfg.precompute_ref_log_probs:
        bad("precompute_ref_log_probs", "not supported with --rounds (the pairs change every round)")
    check_backend(cfg.online_backend, option="--online_backend")
    share = cfg.vllm_gpu_memory_utilization  # the default counts as not given: it is in range
    check_vllm_memory(None if share == VLLM_GPU_MEMORY_UTILIZATION else share, cfg.online_backend, "--online_backend")
    if cfg.online_backend == "vllm" and (cfg.load_in_4bit or cfg.load_in_8bit):
        bad("online_backend", "vllm loads the round's policy from a saved full model, which a quantized policy "
            "cannot give; use --online_backend hf")
    return OnlineSpec(**{name: getattr(cfg, name) for name in _ONLINE_OPTIONS})


def finished_rounds(out: Path) -> int:
    """The last round r such that rounds 1..r all completed."""
    r = 0
    while (out / f"round-{r + 1}" / ROUND_MARKER).is_file():
        r += 1
    return r


def round_prompts(rows: list[dict], r: int, n: int) -> list[dict]:
    """Round r's prompts: the next ``n`` rows of the file, cycling."""
    return [rows[((r - 1) * n + i) % len(rows)] for i in range(n)]


def merge_summaries(parts: list[dict]) -> Summary:
    """One summary from the ranks' summaries (counts add up; the speed follows from tokens and time)."""
    s = Summary(backend=parts[0]["backend"])
    for key in ("prompts", "samples", "nan_dropped", "duplicates", "correct", "prompts_with_pair", "pairs",
                "tied_pairs", "reference_fallbacks", "generated_tokens"):
        setattr(s, key, sum(p[key] for p in parts))
    for p in parts:
        for k, v in p["score_histogram"].items():
            s.score_histogram[k] = s.score_histogram.get(k, 0) + v
    s.generation_seconds = max(p["generation_seconds"] for p in parts)  # ranks run side by side
    return s


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _reference_state(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter once (a head tied to the embedding is one tensor, which safetensors requires)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in ref.named_parameters()}


@torch.no_grad()
def load_reference(ref: torch.nn.Module, out: Path, r: int) -> None:
    """The reference that round r + 1 scores against, as saved at the end of round r."""
    path = out / f"round-{r}" / REFERENCE_FILE
    if not path.is_file():
        raise ConfigError(f"--sync_ref_model: {path} is missing: round {r} was trained without --sync_ref_model, "
                          "so the run cannot be resumed with it")
    state = load_file(str(path))
    for name, p in ref.named_parameters():
        p.copy_(state[name])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _round_record(r: int, summary: Summary, train_metrics: dict, logs: list[dict], seconds: float) -> dict:
    last = {k: v for rec in logs for k, v in rec.items() if k not in ("step", "epoch")}
    keep = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected")
    return {
        "round": r, "prompts": summary.prompts, "samples": summary.samples, "share_correct": summary.share_correct,
        "prompts_with_pair": summary.prompts_with_pair, "pairs": summary.pairs, "tied_pairs": summary.tied_pairs,
        "nan_dropped": summary.nan_dropped, "generation_tokens_per_second": summary.tokens_per_second,
        "generation_seconds": summary.generation_seconds, "train_loss": train_metrics.get("train_loss"),
        "train_seconds": train_metrics.get("train_runtime"), "round_seconds": seconds,
        **{k: last[k] for k in keep if k in last},
    }


def _round_config(cfg: PrefConfig, round_dir: Path) -> PrefConfig:
    """The run's options for one round's PrefTrainer: its own output dir, no mid-round checkpoints (rounds
    are the unit of resumption). A shallow copy: re-running TrainingArguments' __post_init__ is not needed."""
    rcfg = copy.copy(cfg)
    rcfg.output_dir, rcfg.save_strategy, rcfg.resume_from_checkpoint = str(round_dir), SaveStrategy.NO, None
    return rcfg


@dataclass
class Rounds:
    """What every round of a run shares: the options, the models, the prompts and the scorer."""

    cfg: PrefConfig
    spec: RunSpec
    online: OnlineSpec
    out: Path
    state: PartialState
    model_path: str
    model: torch.nn.Module
    tokenizer: object
    ref_model: torch.nn.Module | None
    layout: Layout
    rows: list[dict]
    scorer: object


def train_rounds(cfg: PrefConfig) -> dict:
    """Run (or resume) R rounds; returns the rounds' records."""
    spec, online = resolve_run(cfg), resolve_online(cfg)
    done = _rounds_done(cfg, online)
    run = prepare_rounds(cfg, spec, online, done)
    records = [record for r in range(done + 1, online.rounds + 1) if (record := run_round(run, r)) is not None]
    if run.state.is_main_process:
        run.model.save_pretrained(str(run.out))
        run.tokenizer.save_pretrained(str(run.out))
        print(f"\nmodel:  {run.out}  ({'LoRA adapter' if is_peft_model(run.model) else 'full model'})\n"
              f"rounds: {run.out / ROUNDS_LOG}")
    return {"rounds": records}


def _rounds_done(cfg: PrefConfig, online: OnlineSpec) -> int:
    """The rounds a resumed run has finished (0 for a new run, whose output dir is checked)."""
    if not cfg.resume_from_checkpoint:
        check_output_dir(cfg)
        return 0
    out = Path(cfg.output_dir)
    # more rounds extend the run: a round trains on its own schedule and seed, whatever the count
    check_same_run(cfg, out, may_change=frozenset({"rounds"}))
    done = finished_rounds(out)
    logger.info("resuming after round %d of %d", done, online.rounds)
    return done


def prepare_rounds(cfg: PrefConfig, spec: RunSpec, online: OnlineSpec, done: int) -> Rounds:
    """Load the scorer, prompts, policy and reference (as round ``done`` left them), decide the layout, and write
    the run's options and log."""
    if online.online_backend == "vllm" and PartialState().num_processes > 1:
        raise ConfigError("--online_backend vllm: runs in one process (each rank would start its own engine on a "
                          "GPU it trains on); launch without accelerate's processes, or use --online_backend hf")
    # a reward model scores on this rank's device under the run's autocast, as its training steps compute
    scorer = build_scorer(online.online_scorer, reference_field=online.online_reference_field,
                          allow_pickle=cfg.allow_pickle, device=torch.device(cfg.device),
                          autocast_dtype=cfg.autocast_dtype)
    rows = [dict(r) for r in load_rows(online.online_prompts, trust_remote_code=cfg.trust_remote_code)]
    if not rows:
        raise ConfigError(f"--online_prompts: {online.online_prompts} holds no prompts")
    out, state = Path(cfg.output_dir), PartialState()
    model_path, model, tokenizer = load_model_and_tokenizer(cfg)
    model.to(torch.device(cfg.device))
    # copied before any round's weights are loaded: the reference stays the starting model
    ref_model = load_reference_model(cfg) or (None if is_peft_model(model) else reference_copy(model))
    if spec.reference.sync_ref_model and ref_model is None:
        raise ConfigError("--sync_ref_model needs a separate reference model to update (not a peft model with "
                          "adapters disabled)")
    accel.install(cfg)  # registers the segment attention, so packed pairs are a choice below
    layout = resolve_layout(cfg.share_prompt, cfg.pack_pairs, model, ref_model)
    if done:
        model.load_state_dict(load_file(str(out / f"round-{done}" / TRAINABLE_FILE)), strict=False)
        if spec.reference.sync_ref_model:
            load_reference(ref_model, out, done)
        elif (out / f"round-{done}" / REFERENCE_FILE).is_file():
            raise ConfigError(f"--sync_ref_model: round {done} of {out} was trained with it; pass it to resume")
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        (out / CONFIG_FILE).write_text(yaml.safe_dump(resolved_config_dict(cfg), sort_keys=True))
        log_path = out / ROUNDS_LOG
        if log_path.exists():  # drop records of rounds past the one resumed from
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["round"] <= done]
            log_path.write_text("".join(ln + "\n" for ln in kept))
    return Rounds(cfg, spec, online, out, state, model_path, model, tokenizer, ref_model, layout, rows, scorer)


def sample_round(run: Rounds, r: int) -> tuple[list[dict], Summary]:
    """Round r's pairs, sampled and scored by every rank on its shard of the prompts, gathered, and written."""
    cfg, online, state = run.cfg, run.online, run.state
    todo = round_prompts(run.rows, r, online.samples_per_round)[state.process_index :: state.num_processes]
    seed = cfg.seed + 1000 * r + state.process_index
    autocast = cfg.autocast_dtype
    sopts = SampleOptions(num_samples=online.online_num_samples, temperature=online.online_temperature,
                          max_new_tokens=online.online_max_new_tokens, seed=seed,
                          batch_size=cfg.per_device_eval_batch_size, backend=online.online_backend,
                          vllm_gpu_memory_utilization=online.vllm_gpu_memory_utilization,
                          vllm_dtype=str(autocast or torch.float32).removeprefix("torch."))
    popts = PairOptions(pairing=online.online_pairing, reference_fallback=online.online_reference_fallback)
    device = torch.device(cfg.device)
    vllm_dir = save_policy_for_vllm(run, r) if online.online_backend == "vllm" else None
    try:
        # sampled under the run's autocast, as its training steps run (vLLM: in that dtype)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            pairs, summary = make_pairs(run.model, run.tokenizer, todo, run.scorer, sopts, popts,
                                        prompt_field=online.online_prompt_field, source=online.online_prompts,
                                        model_name=f"{cfg.model_name_or_path or run.model_path}@round-{r - 1}",
                                        rng=random.Random(seed),
                                        model_path=str(vllm_dir) if vllm_dir else None)
    finally:
        if vllm_dir is not None:
            shutil.rmtree(vllm_dir, ignore_errors=True)
    pairs = gather_object(pairs) if state.num_processes > 1 else pairs
    parts = gather_object([summary.to_dict()]) if state.num_processes > 1 else [summary.to_dict()]
    summary = merge_summaries(parts)
    if state.is_main_process:
        write_outputs(pairs, summary, str(run.out / f"round-{r}" / "pairs.jsonl"))
    state.wait_for_everyone()
    logger.info("round %d/%d: %d prompts, %.1f%% correct, %d pairs, %.1f tokens/s", r, online.rounds,
                summary.prompts, 100 * summary.share_correct, summary.pairs, summary.tokens_per_second)
    return pairs, summary


def save_policy_for_vllm(run: Rounds, r: int) -> Path:
    """The policy as round r starts, saved as a full HF model (LoRA adapters merged into a copy) with its
    tokenizer, for vLLM's engine to load: vLLM takes a directory, not a torch module, so every round writes and
    reads the whole model once."""
    path = run.out / f"round-{r}" / VLLM_POLICY_DIR
    model = copy.deepcopy(run.model).merge_and_unload() if is_peft_model(run.model) else run.model
    model.save_pretrained(str(path))
    run.tokenizer.save_pretrained(str(path))
    return path


def train_round(run: Rounds, r: int) -> dict:
    """One ordinary PrefTrainer run on round r's pairs; its training metrics."""
    round_dir = run.out / f"round-{r}"
    rcfg = _round_config(run.cfg, round_dir)
    if run.state.is_main_process and (round_dir / "metrics.jsonl").exists():
        (round_dir / "metrics.jsonl").unlink()  # a killed round's partial curve
    pairs_file = str(round_dir / "pairs.jsonl")
    ds, _ = prepare_dataset(load_rows(pairs_file), run.tokenizer, run.spec.data, source=pairs_file)
    # the round's spec: the run's, with TR-DPO's sync moved to round boundaries (run_round), not every N steps
    spec = dataclasses.replace(run.spec, reference=dataclasses.replace(run.spec.reference, sync_ref_model=False))
    trainer = PrefTrainer(model=run.model, args=rcfg, train_dataset=ds, processing_class=run.tokenizer,
                          ref_model=run.ref_model, run_forwards=accel.install(rcfg).run_forwards, layout=run.layout,
                          spec=spec)
    metrics = dict(trainer.train().metrics)
    trainer.save_model(str(round_dir))
    return metrics


def run_round(run: Rounds, r: int) -> dict | None:
    """Sample, train, sync the reference and checkpoint round r; its record (on the main process)."""
    t0 = time.time()
    round_dir = run.out / f"round-{r}"
    pairs, summary = sample_round(run, r)
    train_metrics: dict = {}
    if pairs:
        train_metrics = train_round(run, r)
    else:
        logger.warning("round %d: no pairs (every prompt's samples tied); the policy is unchanged", r)
    if run.spec.reference.sync_ref_model:  # every rank: each holds its own reference
        mix_into_reference(run.model, run.ref_model, run.cfg.ref_model_mixup_alpha)
    record = None
    if run.state.is_main_process:
        save_file(_trainable_state(run.model), str(round_dir / TRAINABLE_FILE))
        if run.spec.reference.sync_ref_model:
            save_file(_reference_state(run.ref_model), str(round_dir / REFERENCE_FILE))
        logs = []
        if (round_dir / "metrics.jsonl").is_file():
            logs = [json.loads(ln) for ln in (round_dir / "metrics.jsonl").read_text().splitlines() if ln]
        record = _round_record(r, summary, train_metrics, logs, time.time() - t0)
        with (run.out / ROUNDS_LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
        _write_atomic(round_dir / ROUND_MARKER, str(r))
        print(f"round {r}/{run.online.rounds}: share correct {100 * record['share_correct']:.1f}%, "
              f"{record['pairs']} pairs, train loss {_fmt(record['train_loss'])}, "
              f"{record['generation_tokens_per_second']:.1f} tokens/s, {record['round_seconds']:.1f} s", flush=True)
    run.state.wait_for_everyone()
    return record


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
