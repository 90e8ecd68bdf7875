"""Which one-forward layouts are exact on a given model, decided once from the model's structure.

A batch of pairs can be laid out three ways for one forward pass (:class:`~prefkit.data.types.PairBatch`):

- **two rows per pair** (prompt+chosen, prompt+rejected; TRL's layout): exact on every model;
- **shared prompt**: prompt, chosen and rejected of a pair in one row, a 4D mask that hides the chosen tokens
  from the rejected ones, and position ids that restart the rejected response after the prompt;
- **packed pairs**: the shared-prompt segments of all pairs end to end in one row, attention per pair
  (:mod:`prefkit.accel.attention`).

The last two change what each token can see. They equal the two-row layout only if every layer mixes tokens
through attention that honours the mask, the model takes its positions from ``position_ids``, and sliding
windows are counted in logical positions (which prefkit's masks do). :func:`layout_support` reads that from the
model: its modelling code, its attention implementation, its config's ``layer_types`` / ``sliding_window`` /
``attention_chunk_size``, and the modules present (a convolution mixes neighbouring tokens whatever mask it is
given). :func:`resolve_layout` turns the options (True / False / None = where exact) and the models of a run
(policy and reference) into the :class:`Layout` the collator builds; tests/test_zoo.py checks the decision against
the two-row layout on every causal-LM architecture of the installed transformers.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass

from torch import nn

from prefkit.data.types import SEGMENT_ATTENTION
from prefkit.errors import ConfigError
from prefkit.logprobs import segment_attention_registered, unwrap_model

logger = logging.getLogger(__name__)

# layer types whose token mixing is masked attention; any other (linear_attention, mamba, conv, …) is not
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# a backbone forward that takes a {layer type: 4D mask} mapping, as transformers' hybrid-window models do
_TAKES_MASK_MAPPING = re.compile(r"isinstance\(\s*(?:\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")


@dataclass(frozen=True)
class LayoutSupport:
    """What :func:`layout_support` found for one model: ``shared`` / ``packed`` is None where that layout is exact,
    else the reason it is not. ``window``: the sliding window of its windowed layers (None: none). ``mask_types``:
    the layer types of a model whose forward takes one 4D mask per layer type (None: one mask for every layer)."""

    model: str
    shared: str | None = None
    packed: str | None = None
    window: int | None = None
    mask_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Layout:
    """The layout a run's collator builds, and the window its shared-prompt masks count in logical positions."""

    share_prompt: bool = False
    pack_pairs: bool = False
    window: int | None = None
    mask_types: tuple[str, ...] | None = None

    def describe(self) -> str:
        return "packed pairs" if self.pack_pairs else "shared prompt" if self.share_prompt else "two rows per pair"


def _backbone(model: nn.Module) -> nn.Module:
    try:
        inner = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return model
    return inner if isinstance(inner, nn.Module) else model


def _forward_source(model: nn.Module) -> str:
    try:
        return inspect.getsource(type(_backbone(model)).forward)
    except (OSError, TypeError):
        return ""


def _mixing_reason(model: nn.Module, text_config) -> str | None:
    """Why some layer mixes tokens outside the attention mask, or None."""
    if not type(model).__module__.startswith("transformers."):
        return "its modelling code is not transformers' own (remote code), so prefkit cannot check how it mixes tokens"
    if not getattr(model, "_supports_attention_backend", False):
        return "its attention does not run through transformers' attention interface"
    other = sorted(set(getattr(text_config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other:
        return f"its {', '.join(other)} layers are not full or sliding-window attention"
    conv = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv1d)), None)
    if conv is not None:
        return f"its convolution {conv} mixes neighbouring tokens outside attention"
    if getattr(text_config, "keep_window_size", None):
        return "its dynamic mask keeps the strongest keep_window_size keys of the whole row"
    if getattr(text_config, "attention_chunk_size", None):
        return "its chunked attention counts chunks in the row's positions"
    if any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules()):
        return "it counts positions from the input ids instead of taking position_ids"
    if getattr(text_config, "alibi", False) or getattr(text_config, "position_embedding_type", None) == "alibi":
        return "its ALiBi biases are computed from the row, not from position_ids"
    if "position_ids" not in inspect.signature(type(_backbone(model)).forward).parameters:
        return "its forward takes no position_ids"
    return None


def _windows(model: nn.Module, text_config) -> tuple[int | None, tuple[str, ...] | None, str | None]:
    """(window, mask types, reason the shared prompt cannot apply the window) of a model."""
    types = tuple(dict.fromkeys(getattr(text_config, "layer_types", None) or ()))
    window = getattr(text_config, "sliding_window", None)
    source = _forward_source(model)
    if types:
        windowed = "sliding_attention" in types
    else:  # a config may carry a window its model never applies (it only sizes a cache): read the forward
        windowed = window is not None and "sliding_window" in source
    if not windowed or not window:
        return None, None, None
    if len(types) <= 1:  # every layer windowed: one windowed mask serves them all
        return int(window), None, None
    if not _TAKES_MASK_MAPPING.search(source):
        return int(window), None, ("its sliding-window and full-attention layers need different masks, and its "
                                   "forward takes only one")
    return int(window), types, None


def layout_support(model: nn.Module) -> LayoutSupport:
    """Which of the shared-prompt and packed layouts are exact on ``model`` (peft / DDP wrappers looked through)."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    if config is None:
        reason = "it has no transformers config to read its layers from"
        return LayoutSupport(name, shared=reason, packed=reason)
    text = config.get_text_config()
    mixing = _mixing_reason(inner, text)
    window, mask_types, window_reason = _windows(inner, text)
    impl = getattr(config, "_attn_implementation", None)
    shared = mixing or window_reason or (
        None if impl in ("eager", "sdpa", SEGMENT_ATTENTION) else f"its attention ({impl}) ignores a 4D mask")
    packed = mixing or (None if impl in ("sdpa", SEGMENT_ATTENTION) else
                        f"packed pairs run on sdpa and it uses {impl!r} (load it with attn_implementation='sdpa')")
    return LayoutSupport(name, shared=shared, packed=packed, window=window, mask_types=mask_types)


def resolve_layout(share_prompt: bool | None, pack_pairs: bool | None, *models: nn.Module | None) -> Layout:
    """The layout for a run over ``models`` (policy, then reference; None entries skipped). ``share_prompt`` /
    ``pack_pairs``: True asks for the layout and is refused (:class:`ConfigError`, with the reason) where it is not
    exact; None uses it where it is exact (packed pairs also need the host layer's segment attention registered);
    False never uses it. A fallback from a None option is logged once, naming the model and the reason."""
    found = [layout_support(m) for m in models if m is not None]
    windows = {s.window for s in found}
    mask_types = {s.mask_types for s in found}
    mismatch = ("the policy and the reference have different sliding windows, and one batch layout serves both"
                if len(windows) > 1 or len(mask_types) > 1 else None)

    def why_not(attr: str) -> tuple[str, str] | None:
        for s in found:
            if getattr(s, attr) is not None:
                return s.model, getattr(s, attr)
        return (found[0].model, mismatch) if mismatch else None

    wants_pack = pack_pairs is True or (pack_pairs is None and share_prompt is not False)
    if pack_pairs is True and share_prompt is False:
        raise ConfigError("--pack_pairs true needs the shared prompt: drop --share_prompt false")
    share = share_prompt is not False
    if share and (blocked := why_not("shared")):
        if share_prompt is True or pack_pairs is True:  # packed pairs are shared-prompt segments
            flag = "--share_prompt" if share_prompt is True else "--pack_pairs"
            raise ConfigError(f"{flag} true: the shared prompt is not exact on {blocked[0]}: {blocked[1]}; "
                              f"run with {flag} false")
        share = False
        logger.info("layout: two rows per pair on %s (the shared prompt would not be exact: %s)", *blocked)
    pack = share and wants_pack
    if pack and (blocked := why_not("packed")):
        if pack_pairs is True:
            raise ConfigError(f"--pack_pairs true: packed pairs are not exact on {blocked[0]}: {blocked[1]}; "
                              "run with --pack_pairs false")
        pack = False
        logger.info("layout: shared prompt on %s (packed pairs would not be exact: %s)", *blocked)
    if pack and not segment_attention_registered():
        if pack_pairs is True:
            raise ConfigError("--pack_pairs true: packed pairs need the segment attention, which the host layer "
                              "registers with transformers: call prefkit.accel.install(args) first, or pass "
                              "pack_pairs=False")
        pack = False
    window = next(iter(windows)) if found and not mismatch else None
    types = next(iter(mask_types)) if found and not mismatch else None
    return Layout(share_prompt=share, pack_pairs=pack, window=window if share else None,
                  mask_types=types if share and not pack else None)
