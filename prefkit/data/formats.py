"""TRL's preference formats → (prompt, chosen, rejected) texts.

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: ``chosen``/``rejected`` full texts sharing the prompt as a prefix (HH-RLHF transcripts);
  the prompt is the longest common prefix cut back to a turn boundary (right after the last shared
  ``"\\n\\nAssistant:"``), or, for other texts, to just before the last whitespace (which starts the responses);
- conversational: lists of ``{role, content}`` messages (explicit ``prompt`` or implicit shared prefix),
  rendered with the tokenizer's chat template; the response text is render(prompt + response) minus
  render(prompt, add_generation_prompt=True), as TRL does.

Schema problems (missing fields, wrong types, unknown roles, mixed formats) are fatal ``DataError``s naming
file, row and field; content problems (empty or identical responses) are returned as skip reasons.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from prefkit.errors import DataError, one_line

TURN_MARKER = "\n\nAssistant:"
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PairText:
    prompt: str
    chosen: str
    rejected: str
    # the end of a rendered generation prompt that the conversation does not render, left out of the pair
    dropped: str = ""


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
    """End of the shared prompt: after the last shared turn marker, else before the last shared whitespace
    run, so the responses start with it (``'The sky is'`` + ``' blue.'``, as TRL splits and as BPE
    vocabularies hold words with their leading space)."""
    common = chosen[: _common_prefix(chosen, rejected)]
    marker = common.rfind(TURN_MARKER)
    if marker >= 0:
        return marker + len(TURN_MARKER)
    cut = max(common.rfind(" "), common.rfind("\n"))
    return len(common[: cut + 1].rstrip()) if cut >= 0 else 0


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
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise DataError(f"message {i} is not a {{role, content}} object", source=source, row=row, field=field)
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has unknown role {m['role']!r} (expected one of {ROLES})",
                            source=source, row=row, field=field)
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise DataError(f"message {i} tool_calls is not a list", source=source, row=row, field=field)
        # an assistant turn that only calls tools has no text (content null, as TRL's tool-calling data has it)
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and calls):
            raise DataError(f"message {i} content is not a string (null only beside tool_calls)", source=source,
                            row=row, field=field)
    return value


# apply_chat_template's own arguments, which prefkit sets: a row's chat_template_kwargs may not override them
_RESERVED_KWARGS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict")


def template_kwargs(row: dict, source: str, row_no: int) -> dict:
    """The row's ``tools`` and ``chat_template_kwargs`` as apply_chat_template keywords, as TRL passes them
    (``tools`` may be a JSON string; null or absent means none)."""
    kwargs: dict = {}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", source=source, row=row_no,
                            field="tools") from e
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError("expected a list of JSON-schema objects (or that list as a JSON string), got "
                            f"{type(tools).__name__}", source=source, row=row_no, field="tools")
        kwargs["tools"] = tools
    extra = row.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
            raise DataError("expected an object of keyword arguments for the chat template (e.g. "
                            f'{{"enable_thinking": false}}), got {type(extra).__name__}', source=source, row=row_no,
                            field="chat_template_kwargs")
        clash = [k for k in extra if k in _RESERVED_KWARGS]
        if clash:
            raise DataError(f"{clash[0]!r} is set by prefkit when it renders the prompt and the responses; remove "
                            "it from the row", source=source, row=row_no, field="chat_template_kwargs")
        kwargs.update(extra)
    return kwargs


def text_pair(row: dict, source: str, row_no: int, implicit: bool) -> PairText:
    for field in ("chat_template_kwargs", "tools"):
        if row.get(field):  # TRL ignores them here without a word
            raise DataError("only conversational rows are rendered with a chat template, so this text row's "
                            f"{field} would change nothing; drop the field or give the row as messages",
                            source=source, row=row_no, field=field)
    chosen = _check_str(row.get("chosen"), source, row_no, "chosen")
    rejected = _check_str(row.get("rejected"), source, row_no, "rejected")
    if not implicit:
        return PairText(_check_str(row.get("prompt"), source, row_no, "prompt"), chosen, rejected)
    cut = split_implicit_prompt(chosen, rejected)
    return PairText(chosen[:cut], chosen[cut:], rejected[cut:])


def _render(tokenizer, messages: list[dict], kwargs: dict, source: str, row_no: int, field: str, **extra) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **extra, **kwargs)
    except Exception as e:  # a Jinja error on this row's messages, tools or keyword arguments
        raise DataError(f"the chat template cannot render this row ({one_line(e)})", source=source, row=row_no,
                        field=field) from e


def _outside_added_tokens(texts: tuple[str, ...], n: int, tokenizer) -> int:
    """``n`` moved back to the start of any added token (``<|im_start|>``, ``<think>``…) that spans it in one of
    ``texts``: a cut inside one would tokenize both halves as plain text."""
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        t = tok.content
        for text in texts:
            at = text.find(t, max(0, n - len(t) + 1), n + len(t) - 1)
            if 0 <= at < n:
                n = at
    return n


def conversational_pair(row: dict, tokenizer, source: str, row_no: int, implicit: bool) -> PairText:
    """The pair's texts. The prompt is rendered with ``add_generation_prompt=True`` and each response is the rest
    of render(prompt + response). A generation prompt that the conversation renders otherwise (an empty thought
    block that the full conversation drops) is cut where the texts part, as TRL cuts, and the text left out is
    in ``dropped``; a template that renders the prompt's messages themselves otherwise cannot be split."""
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
    kwargs = template_kwargs(row, source, row_no)
    prompt_text = _render(tokenizer, prompt, kwargs, source, row_no, "prompt", add_generation_prompt=True)
    fulls = [_render(tokenizer, prompt + msgs, kwargs, source, row_no, field)
             for field, msgs in (("chosen", chosen), ("rejected", rejected))]
    cut = min(_common_prefix(prompt_text, full) for full in fulls)
    if cut < len(prompt_text):
        # the messages alone: the generation prompt must only add to them, and the cut lie in what it adds, or
        # prompt text would be scored as response
        base = _render(tokenizer, prompt, kwargs, source, row_no, "prompt")
        field = "chosen" if _common_prefix(prompt_text, fulls[0]) == cut else "rejected"
        if not prompt_text.startswith(base) or cut < len(base):
            raise DataError(
                f"the chat template renders the prompt's messages differently inside the conversation (from "
                f"{prompt_text[cut:cut + 30]!r}), so the response boundary cannot be found; use a template that "
                "renders them the same way", source=source, row=row_no, field=field)
        cut = _outside_added_tokens((prompt_text, *fulls), cut, tokenizer)
    return PairText(prompt_text[:cut], fulls[0][cut:], fulls[1][cut:], dropped=prompt_text[cut:])
