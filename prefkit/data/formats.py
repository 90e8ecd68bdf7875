"""TRL's preference formats → (prompt, chosen, rejected) texts.

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: ``chosen``/``rejected`` full texts sharing the prompt as a prefix (HH-RLHF transcripts);
  the prompt is the longest common prefix cut back to a turn boundary (right after the last shared
  ``"\\n\\nAssistant:"``), or, for other texts, to the last whitespace;
- conversational: lists of ``{role, content}`` messages (explicit ``prompt`` or implicit shared prefix),
  rendered with the tokenizer's chat template; the response text is render(prompt + response) minus
  render(prompt, add_generation_prompt=True), as TRL does.

Schema problems (missing fields, wrong types, unknown roles, mixed formats) are fatal ``DataError``s naming
file, row and field; content problems (empty or identical responses) are returned as skip reasons.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from prefkit.errors import DataError

TURN_MARKER = "\n\nAssistant:"
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PairText:
    prompt: str
    chosen: str
    rejected: str


def check_columns(columns: list[str], source: str) -> None:
    """Fatal unless the dataset has ``chosen`` and ``rejected`` columns; suggest the closest names."""
    cols = [c for c in columns if not c.startswith("__")]
    missing = [f for f in ("chosen", "rejected") if f not in cols]
    if not missing:
        return
    hints = []
    for f in missing:
        close = difflib.get_close_matches(f, cols, n=1, cutoff=0.5)
        if close:
            hints.append(f"{close[0]!r} → rename to {f!r}?")
    raise DataError(
        f"missing field(s) {', '.join(repr(m) for m in missing)}; columns found: {cols}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + ". Expected prompt/chosen/rejected (standard or conversational) or chosen/rejected (implicit prompt)",
        source=source,
        field=missing[0],
    )


def row_kind(row: dict) -> str:
    """'text' or 'conversational', from the type of ``chosen``."""
    return "conversational" if isinstance(row.get("chosen"), list) else "text"


def _common_prefix(a: str, b: str) -> int:
    # bisection over slice comparisons, which run in C: multi-turn transcripts share long prefixes, and a
    # per-character Python loop over them is a visible share of data preparation (docs/performance.md, lever 9)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_implicit_prompt(chosen: str, rejected: str) -> int:
    """End of the shared prompt: after the last shared turn marker, else at the last shared whitespace."""
    common = chosen[: _common_prefix(chosen, rejected)]
    marker = common.rfind(TURN_MARKER)
    if marker >= 0:
        return marker + len(TURN_MARKER)
    cut = max(common.rfind(" "), common.rfind("\n"))
    return cut + 1 if cut >= 0 else 0


def _check_str(value: object, source: str, row: int, field: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise DataError(f"expected a string, got {got}", source=source, row=row, field=field)
    return value


def _check_messages(value: object, source: str, row: int, field: str) -> list[dict]:
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        raise DataError(f"expected a list of {{role, content}} messages, got {got}", source=source, row=row,
                        field=field)
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"message {i} is not a {{role, content}} object", source=source, row=row, field=field)
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has unknown role {m['role']!r} (expected one of {ROLES})",
                            source=source, row=row, field=field)
        if not isinstance(m["content"], str):
            raise DataError(f"message {i} content is not a string", source=source, row=row, field=field)
    return value


def text_pair(row: dict, source: str, row_no: int, implicit: bool) -> PairText:
    chosen = _check_str(row.get("chosen"), source, row_no, "chosen")
    rejected = _check_str(row.get("rejected"), source, row_no, "rejected")
    if not implicit:
        return PairText(_check_str(row.get("prompt"), source, row_no, "prompt"), chosen, rejected)
    cut = split_implicit_prompt(chosen, rejected)
    return PairText(chosen[:cut], chosen[cut:], rejected[cut:])


def conversational_pair(row: dict, tokenizer, source: str, row_no: int, implicit: bool) -> PairText:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("conversational data needs a tokenizer with a chat template; this tokenizer has none",
                        source=source, row=row_no, field="chosen")
    chosen = _check_messages(row.get("chosen"), source, row_no, "chosen")
    rejected = _check_messages(row.get("rejected"), source, row_no, "rejected")
    if implicit:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # the responses start at an assistant turn
        while n > 0 and (n >= len(chosen) or chosen[n]["role"] != "assistant"):
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = _check_messages(row.get("prompt"), source, row_no, "prompt")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("no assistant turn in the response", source=source, row=row_no, field=field)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(prompt + msgs, tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError("the chat template renders the prompt differently inside the conversation; cannot "
                            "find the response boundary", source=source, row=row_no, field=field)
        out.append(full[len(prompt_text):])
    return PairText(prompt_text, out[0], out[1])
