"""Validate, format and tokenize preference rows into ``prompt_ids``/``chosen_ids``/``rejected_ids``.

Rules (docs/data.md):
- prompt and responses are tokenized separately and concatenated, so the boundary is token-exact;
- the tokenizer's BOS is put in front of the prompt iff the tokenizer adds one by itself and the prompt does
  not already start with it (never doubled);
- every response ends with EOS (a response that already contains EOS, as chat templates render it, is cut
  right after its last one);
- with ``max_prompt_length`` the prompt is truncated first (``keep_end`` keeps its end, and its BOS when the
  tokenizer adds one, ``keep_start`` its start); then responses are cut to ``max_length − len(prompt)`` keeping their start (they lose their EOS);
  without it, a prompt that alone fills ``max_length`` is skipped.
Content problems skip the row and are counted by reason; schema problems raise ``DataError``.
"""

from __future__ import annotations

import json
import logging
import math

from datasets import Dataset

from prefkit.data.formats import PairText, check_columns, conversational_pair, row_kind, text_pair
from prefkit.data.load import ROW
from prefkit.data.spec import DataSpec
from prefkit.data.types import SkipReport
from prefkit.errors import ConfigError, DataError

logger = logging.getLogger("prefkit")
WEIGHT_FIELDS = ("chosen_token_weights", "rejected_token_weights")
# precomputed reference columns: TRL's (one log-prob per response, carried from raw rows as given) and prefkit's
# cache's (one per response token, prefkit.refcache)
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
# texts per tokenizer call: one call over a whole column builds every row's encoding (tokens, offsets, masks) at
# once; freed, that memory stays in the heap between the id lists that are kept (docs/performance.md, job (a)'s
# peak memory)
ENCODE_CHUNK = 256


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def _end_with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None:
        return ids
    if eos in ids:  # the last one: a response of several turns (a tool call, its result, the answer) has one each
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids + [eos]


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], cfg: DataSpec, bos: int | None) -> tuple | None:
    if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
        keep = cfg.max_prompt_length
        if cfg.truncation_mode == "keep_start":
            prompt = prompt[:keep]
        elif bos is not None and prompt[0] == bos and keep > 1:  # the model was trained with BOS first: keep it
            prompt = [bos, *prompt[len(prompt) - keep + 1 :]]
        else:
            prompt = prompt[-keep:]
    if cfg.max_length is None:
        return prompt, chosen, rejected
    room = cfg.max_length - len(prompt)
    if room < 1:
        return None
    return prompt, chosen[:room], rejected[:room]


def _format(rows, tokenizer, source: str, report: SkipReport, implicit: bool) -> list[tuple[int, PairText, dict]]:
    out = []
    first_kind: tuple[str, bool, int] | None = None
    dropped: list[tuple[int, str]] = []
    for row in rows:
        row_no = row.get(ROW, -1)
        kind = row_kind(row)
        if first_kind is None:
            first_kind = (kind, implicit, row_no)
        elif (kind, implicit) != first_kind[:2]:
            raise DataError(
                f"mixed formats: this row is {_name(kind, implicit)} but row {first_kind[2]} is "
                f"{_name(*first_kind[:2])}; use one format per file",
                source=source, row=row_no, field="chosen",
            )
        if kind == "conversational":
            pair = conversational_pair(row, tokenizer, source, row_no, implicit)
            if pair.dropped:
                dropped.append((row_no, pair.dropped))
        else:
            pair = text_pair(row, source, row_no, implicit)
        where = f"row {row_no}"
        if not pair.prompt.strip():
            report.add("empty prompt", where)
        elif not pair.chosen.strip():
            report.add("empty chosen", where)
        elif not pair.rejected.strip():
            report.add("empty rejected", where)
        elif pair.chosen == pair.rejected:
            report.add("chosen identical to rejected", where)
        else:
            out.append((row_no, pair, row))
    if dropped:
        logger.warning(
            "%s: in %d row(s) (e.g. row %d) the chat template's generation prompt ends with %r, which the "
            "conversation does not render: the prompt is cut where the two part, as TRL cuts it, so the model "
            "trains without that text in front of the response (a template that renders the prompt the same "
            "way in both avoids it)", source, len(dropped), dropped[0][0], dropped[0][1])
    return out


def _name(kind: str, implicit: bool) -> str:
    return f"{kind} ({'implicit prompt' if implicit else 'explicit prompt'})"


def prepare_dataset(rows, tokenizer, cfg: DataSpec, *, source: str, max_samples: int | None = None) -> tuple[Dataset, SkipReport]:
    """Tokenized pairs (columns prompt_ids, chosen_ids, rejected_ids, row_id, length[, token weights][, TRL's
    per-response reference log-probs]) + skip report."""
    columns = list(getattr(rows, "column_names", []))
    check_columns(columns, source)
    if len(rows) == 0:
        raise DataError("the dataset is empty", source=source)
    if cfg.use_token_weights and "rejected_token_weights" not in columns:
        raise DataError("--use_token_weights needs a 'rejected_token_weights' field (prefkit critical-tokens "
                        f"writes it); columns found: {columns}", source=source, field="rejected_token_weights")
    report = SkipReport()
    n = len(rows) if max_samples is None else min(max_samples, len(rows))
    formatted = _format((rows[i] for i in range(n)), tokenizer, source, report, implicit="prompt" not in columns)
    report.total = len(formatted) + sum(report.skipped.values())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = _adds_bos(tokenizer)

    def encode(texts: list[str]) -> list[list[int]]:
        return [ids for i in range(0, len(texts), ENCODE_CHUNK)
                for ids in tokenizer(texts[i : i + ENCODE_CHUNK], add_special_tokens=False)["input_ids"]]

    prompts = encode([p.prompt for _, p, _ in formatted])
    chosens = encode([p.chosen for _, p, _ in formatted])
    rejecteds = encode([p.rejected for _, p, _ in formatted])
    # "length" (tokens of the pair) lets --train_sampling_strategy group_by_length bucket pairs of similar cost
    result: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "row_id": [], "length": []}
    if cfg.use_token_weights:
        result.update({f: [] for f in WEIGHT_FIELDS})
    ref_fields = [f for f in REF_FIELDS if f in columns]
    if ref_fields:
        if len(ref_fields) == 1:
            other = next(f for f in REF_FIELDS if f not in columns)
            raise DataError(f"{ref_fields[0]!r} without {other!r}: give both reference columns or neither",
                            source=source, field=other)
        result.update({f: [] for f in REF_FIELDS})
    for (row_no, _, row), p, c, r in zip(formatted, prompts, chosens, rejecteds):
        if add_bos and (not p or p[0] != bos):
            p = [bos, *p]
        c, r = _end_with_eos(c, eos), _end_with_eos(r, eos)
        full_lengths = (len(c), len(r))
        cut = _truncate(p, c, r, cfg, bos if add_bos else None)
        if cut is None:
            report.add("prompt longer than max_length", f"row {row_no}")
            continue
        p, c, r = cut
        result["prompt_ids"].append(p)
        result["chosen_ids"].append(c)
        result["rejected_ids"].append(r)
        result["row_id"].append(row_no)
        result["length"].append(len(p) + len(c) + len(r))
        for field in ref_fields:
            result[field].append(_sequence_logp(row.get(field), source, row_no, field))
        if cfg.use_token_weights:
            for field, ids, full in zip(WEIGHT_FIELDS, (c, r), full_lengths):
                w = row.get(field)
                if w is None and field == "chosen_token_weights":
                    w = [1.0] * full
                # the whole response, or the response as these options cut it (what critical-tokens writes)
                if not isinstance(w, list) or len(w) not in (full, len(ids)):
                    cut_too = f", or {len(ids)} for the response as --max_length cuts it" if len(ids) < full else ""
                    raise DataError(
                        f"expected {full} weights (one per response token incl. EOS under this tokenizer){cut_too}, "
                        f"got {len(w) if isinstance(w, list) else type(w).__name__}",
                        source=source, row=row_no, field=field,
                    )
                result[field].append(_weights(w[: len(ids)], source, row_no, field))
    if not result["row_id"]:
        raise DataError(f"every pair was skipped: {report.summary()}", source=source)
    return Dataset.from_dict(result), report


def _sequence_logp(value: object, source: str, row_no: int, field: str) -> float:
    """One reference log-prob of a whole response (TRL's precomputed column): a finite number ≤ 0."""
    if isinstance(value, list):
        raise DataError("per-token reference log-probs in raw rows cannot be matched to prefkit's tokenization; "
                        "give one log-prob per response (TRL's format), or drop the reference columns and let "
                        "prefkit compute them (--precompute_ref_log_probs caches them)", source=source, row=row_no,
                        field=field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0:
        raise DataError(f"expected the reference's log-probability of the response (a finite number <= 0), got "
                        f"{json.dumps(value, default=str)[:40]}", source=source, row=row_no, field=field)
    return float(value)


def _weights(values: list, source: str, row_no: int, field: str) -> list[float]:
    """Token weights as floats: each a finite, non-negative number (a NaN or negative weight would change the
    loss without a word)."""
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise DataError(f"weight {i} is {json.dumps(x, default=str)[:40]}, not a number", source=source, row=row_no,
                            field=field)
        if not math.isfinite(x) or x < 0:
            raise DataError(f"weight {i} is {x}; token weights must be finite and >= 0", source=source, row=row_no,
                            field=field)
        out.append(float(x))
    return out


def prepare_if_raw(dataset, tokenizer, spec: DataSpec, name: str) -> tuple[Dataset | None, SkipReport | None]:
    """A dataset of raw preference rows tokenized (with a ``__row__`` column of row numbers for error messages),
    or a dataset already prepared (or None) as it is, with no report."""
    if dataset is None or "prompt_ids" in dataset.column_names:
        return dataset, None
    if "__row__" not in dataset.column_names:
        dataset = dataset.add_column("__row__", list(range(len(dataset))))
    return prepare_dataset(dataset, tokenizer, spec, source=f"{name} dataset")


def split_train_eval(ds: Dataset, eval_split_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Deterministic held-out split: a share if < 1 (at least one pair), a count if >= 1. ConfigError when it
    would leave no training pair."""
    if eval_split_size <= 0:
        return ds, None
    n_eval = max(int(round(eval_split_size * len(ds))), 1) if eval_split_size < 1 else int(eval_split_size)
    if n_eval >= len(ds):
        raise ConfigError(f"--eval_split_size: {eval_split_size:g} holds out {n_eval} of the {len(ds)} training "
                          "pairs, leaving none to train on; pass a smaller share or count")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
