"""Reference log-probs computed once and cached on disk (``--precompute_ref_log_probs true``).

Per-token (not summed) reference log-probs are stored, so every granularity, POET and token weighting works
on them. The cache key covers the reference model (a hash of its weights' content, its name, revision, weight
dtypes, and whether it is a peft model with adapters disabled), prefkit's version, the tokenized pairs and the
collation settings, so a second run with the same inputs skips the reference pass entirely. An entry is checked
row by row on load (one finite log-prob per response token) and computed again when it fails the check.

Under a multi-process launch the pass is sharded: every rank computes a contiguous 1/N of the pairs, the
shards are gathered in rank order (no shared filesystem needed), and the main process writes the cache.
The cache is used only when every rank finds it, so nodes without a shared disk never wait on each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, load_from_disk
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from prefkit.config import PrefConfig
from prefkit.data import DataSpec, PairCollator
from prefkit.data.tokenize import REF_FIELDS as COLUMNS
from prefkit.layouts import Layout, resolve_layout
from prefkit.logprobs import compute_pair_logps, eval_mode
from prefkit.models import cache_root, is_peft_model

logger = logging.getLogger(__name__)


def _weights_digest(model: nn.Module) -> str:
    """A hash of the reference's weights as loaded (names, dtypes, shapes and bytes of every parameter and
    buffer), so an entry belongs to these weights and not to a path whose files may change. A peft model's
    adapters are left out: the reference runs with them disabled."""
    h = hashlib.blake2b(digest_size=20)
    peft = is_peft_model(model)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        if peft and ("lora_" in name or "modules_to_save" in name):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _reference_identity(model: nn.Module) -> str:
    """What of the loaded reference changes its log-probs beyond its path: the weight dtypes (a LoRA base loaded
    in bf16 vs fp32), whether it is a peft model run with its adapters disabled, and the hub revision (the
    commit transformers resolved; None for a local directory)."""
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    config = getattr(model, "config", None)
    return json.dumps({"dtypes": dtypes, "adapter_disabled": is_peft_model(model),
                       "revision": getattr(config, "_commit_hash", None)})


def cache_key(ds: Dataset, model_path: str, static_eos_padding: bool, autocast: torch.dtype | None = None, *,
              reference: nn.Module) -> str:
    h = hashlib.sha256()
    # another version may compute or store log-probs differently
    h.update(f"prefkit={importlib.metadata.version('prefkit')}".encode())
    h.update(model_path.encode())
    h.update(_weights_digest(reference).encode())
    h.update(_reference_identity(reference).encode())
    h.update(f"eos_pad={static_eos_padding}".encode())
    if autocast is not None:  # the reference pass runs under the training's autocast
        h.update(f"autocast={autocast}".encode())
    for row in ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter(batch_size=1024):
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(ds: Dataset, model: nn.Module, collator: PairCollator, batch_size: int,
                            autocast: torch.dtype | None = None) -> dict:
    """Per-token reference log-probs of every pair (adapters disabled for a peft policy), under ``autocast``
    when given (the dtype the training's --bf16 / --fp16 autocasts to)."""
    out: dict[str, list[list[float]]] = {c: [] for c in COLUMNS}
    device = next(model.parameters()).device
    ctx = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
    with eval_mode(model), ctx, torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for start in tqdm(range(0, len(ds), batch_size), desc="reference log-probs", leave=False):
            batch = collator([ds[i] for i in range(start, min(start + batch_size, len(ds)))]).to(device)
            lp = compute_pair_logps(model, batch)
            for tok, mask, col in ((lp.chosen, lp.chosen_mask, COLUMNS[0]), (lp.rejected, lp.rejected_mask, COLUMNS[1])):
                out[col].extend(t[m].tolist() for t, m in zip(tok.cpu(), mask.cpu()))
    return out


def _sharded_reference_logps(ds: Dataset, model: nn.Module, collator: PairCollator, batch_size: int,
                             autocast: torch.dtype | None) -> dict:
    """This rank's contiguous shard of the pairs, then all shards gathered in order onto every rank."""
    state = PartialState()
    if state.num_processes == 1:
        return compute_reference_logps(ds, model, collator, batch_size, autocast)
    shard = ds.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
    logger.info("reference log-probs: rank %d computes %d of %d pairs", state.process_index, len(shard), len(ds))
    parts = gather_object([compute_reference_logps(shard, model, collator, batch_size, autocast)])
    return {c: [row for part in parts for row in part[c]] for c in COLUMNS}


def _check_cached(cached: Dataset, ds: Dataset) -> str | None:
    """What is wrong with a cache entry for ``ds`` (None when nothing): one row per pair, one log-prob per
    response token, every one finite and at most 0 (a log-probability)."""
    if len(cached) != len(ds) or any(c not in cached.column_names for c in COLUMNS):
        return f"has {len(cached)} rows for {len(ds)} pairs"
    for col, ids in zip(COLUMNS, ("chosen_ids", "rejected_ids")):
        for i, (row, tokens) in enumerate(zip(cached[col], ds[ids])):
            if len(row) != len(tokens):
                return f"has {len(row)} {col} for the {len(tokens)} tokens of pair {i}"
            if not all(math.isfinite(x) and x <= 1e-4 for x in row):
                return f"has a value in {col} of pair {i} that is not a finite log-probability"
    return None


def attach_reference_logps(
    ds: Dataset, ref_model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: PrefConfig, *, model_path: str,
    layout: Layout | None = None,
) -> Dataset:
    """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns, from the cache when the key matches; ``layout``:
    the run's (default: resolved for ``ref_model``)."""
    layout = layout or resolve_layout(cfg.share_prompt, cfg.pack_pairs, ref_model)
    collator = PairCollator.for_spec(DataSpec.from_config(cfg), tokenizer, layout)
    autocast = cfg.autocast_dtype
    key = cache_key(ds, model_path, collator.static_eos_padding, autocast, reference=ref_model)
    path = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else cache_root() / "ref_logps"
    path = path / key
    state = PartialState()
    hit = (path / "dataset_info.json").is_file()
    if state.num_processes > 1:
        hit = all(gather_object([hit]))
    cached = None
    if hit:
        cached = load_from_disk(str(path))
        problem = _check_cached(cached, ds)
        if problem is None:
            logger.info("reference log-probs: cache hit %s", path)
        else:
            logger.warning("reference log-probs: cache entry %s %s; computing them again", path, problem)
            cached = None
    if state.num_processes > 1:  # every rank recomputes, or none does
        cached = None if not all(gather_object([cached is not None])) else cached
    if cached is None:
        cached = Dataset.from_dict(_sharded_reference_logps(ds, ref_model, collator, cfg.per_device_eval_batch_size,
                                                              autocast))
        if state.is_main_process:
            logger.info("reference log-probs: writing cache %s", path)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            cached.save_to_disk(str(tmp))
            shutil.rmtree(path, ignore_errors=True)  # an entry that failed its checks
            try:
                os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
    return ds.remove_columns([c for c in COLUMNS if c in ds.column_names]).add_column(
        COLUMNS[0], cached[COLUMNS[0]]
    ).add_column(COLUMNS[1], cached[COLUMNS[1]])
