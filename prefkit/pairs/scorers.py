"""Scorers for `prefkit pairs`: a spec string → an object that scores a batch of completions.

- ``math``: 1.0 when the completion's final number (:func:`final_number`) equals the reference answer's, else
  0.0 (no number: 0.0); the one GSM8K checker, also the bench's GSM8K accuracy;
- ``regex:PATTERN``: 1.0 when the last match of PATTERN in the completion (its first group, if it has one)
  equals the reference field (as numbers when both read as numbers, so ``A:07`` matches 7), else 0.0;
- ``python:module:function``: ``function(prompt, completion, row) -> float``, the user's code;
- ``reward_model:PATH``: the score of an ``AutoModelForSequenceClassification`` (first logit), in batches.

A scorer that raises, or returns something that is not a number, stops the run with one line naming the
prompt row; NaN is allowed and means "drop this sample" (counted in the summary).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from prefkit.errors import ConfigError, DataError, PrefkitError

if TYPE_CHECKING:
    import torch

SPECS = "math | regex:PATTERN | python:module:function | reward_model:PATH"


@dataclass
class Item:
    """One sample to score: the prompt as given (text or messages), its rendered text, the completion, the
    source row (its reference fields) and the row's number in the prompts file."""

    prompt: object
    prompt_text: str
    completion: str
    row: dict
    row_no: int
    source: str = ""


class ScorerError(PrefkitError):
    """The user's scorer failed on a sample."""


# ---- final-number extraction (math) -----------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalize_number(text: str) -> Decimal | None:
    """``"$1,234.50"`` → 1234.5; ``"72.0"`` → 72; None when it is not a number."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


# GSM8K's reference answers end with "#### n"; the bench's GSM8K prompt asks for a final "A: n" line, and so do
# the grade-school-math solution files. "A:" counts only as a word of its own (not the end of "USA:").
_ANSWER_MARKER = re.compile(r"####|(?<![A-Za-z])A:")


def final_number(text: str) -> Decimal | None:
    """The answer a solution ends with: a final ``\\boxed{}``, else the first number after the last answer
    marker (``####`` or ``A:``), else the last number in the text."""
    boxed = _last_boxed(text)
    if boxed is not None:
        found = _NUMBER.findall(boxed.replace("{,}", ",").replace("\\!", "").replace("\\,", ""))
        return normalize_number(found[-1]) if found else None
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        found = _NUMBER.findall(text[markers[-1].end() :])
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def _reference(item: Item, field: str) -> object:
    if field not in item.row or item.row[field] is None:
        raise DataError(f"the scorer needs the reference field {field!r}; columns: "
                        f"{[k for k in item.row if not k.startswith('__')]}", source=item.source or None, row=item.row_no,
                        field=field)
    return item.row[field]


def math_equal(completion: str, reference: object) -> bool:
    want = final_number(str(reference))
    got = final_number(completion)
    return want is not None and got is not None and got == want


def last_match(pattern: re.Pattern, text: str) -> str | None:
    """The last match of ``pattern`` in ``text``: its first group if it has groups, else the whole match."""
    found = pattern.findall(text)
    if not found:
        return None
    last = found[-1]
    return last[0] if isinstance(last, tuple) else last


def same_answer(got: str | None, want: object) -> bool:
    """Equal as numbers when both read as numbers, else as stripped strings."""
    if got is None:
        return False
    a, b = normalize_number(got), normalize_number(str(want))
    if a is not None and b is not None:
        return a == b
    return got.strip() == str(want).strip()


# ---- scorers ----------------------------------------------------------------------------------------------

class Scorer:
    spec: str

    def score(self, items: list[Item]) -> list[float]:
        raise NotImplementedError


class MathScorer(Scorer):
    def __init__(self, spec: str, reference_field: str):
        self.spec, self.field = spec, reference_field

    def score(self, items: list[Item]) -> list[float]:
        return [float(math_equal(it.completion, _reference(it, self.field))) for it in items]


class RegexScorer(Scorer):
    def __init__(self, spec: str, pattern: str, reference_field: str):
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"--scorer {spec}: not a valid regular expression ({e})") from e
        self.spec, self.field = spec, reference_field

    def score(self, items: list[Item]) -> list[float]:
        return [float(same_answer(last_match(self.pattern, it.completion), _reference(it, self.field)))
                for it in items]


class PythonScorer(Scorer):
    def __init__(self, spec: str, target: str):
        module_name, _, func_name = target.rpartition(":")
        if not module_name or not func_name:
            raise ConfigError(f"--scorer {spec}: expected python:module:function")
        try:
            module = _import_user_module(module_name)
        except Exception as e:
            raise ConfigError(f"--scorer {spec}: cannot import module {module_name!r} "
                              f"({type(e).__name__}: {e})") from e
        fn = getattr(module, func_name, None)
        if not callable(fn):
            raise ConfigError(f"--scorer {spec}: module {module_name!r} has no function {func_name!r}")
        self.spec, self.fn = spec, fn

    def score(self, items: list[Item]) -> list[float]:
        out = []
        for it in items:  # the user's function takes one sample; generation stays batched
            row = {k: v for k, v in it.row.items() if not k.startswith("__")}
            try:
                value = self.fn(it.prompt, it.completion, row)
            except Exception as e:
                raise ScorerError(f"--scorer {self.spec} raised {type(e).__name__}: {e} on prompt row "
                                  f"{it.row_no}") from e
            out.append(_as_float(value, self.spec, it.row_no))
        return out


def _import_user_module(module_name: str):
    """The scorer's module: a file of that name under the working directory (``a/b.py`` for ``a.b``), loaded from
    its path under a private name, else an installed module. ``sys.path`` is left as it was, so a file in the
    working directory never stands in for a library module later in the run; while the scorer's file runs, the
    working directory is importable after every library, for helper modules beside it."""
    rel = Path(*module_name.split("."))
    for candidate in (Path.cwd() / rel.with_suffix(".py"), Path.cwd() / rel / "__init__.py"):
        if candidate.is_file():
            name = f"_prefkit_scorer_{module_name}"
            spec = importlib.util.spec_from_file_location(name, candidate)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look a module up by its name
            added = str(Path.cwd()) not in sys.path
            if added:
                sys.path.append(str(Path.cwd()))
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
            return module
    return importlib.import_module(module_name)


def _as_float(value: object, spec: str, row_no: int) -> float:
    """A number, a numpy scalar or a one-element tensor → float; anything else is the scorer's bug."""
    try:
        if isinstance(value, (str, bytes)) or value is None:
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError) as e:
        raise ScorerError(f"--scorer {spec} returned {type(value).__name__} on prompt row {row_no}; expected a "
                          "float (NaN to drop the sample)") from e


def scorer_device(spec: str, device: torch.device | str | None) -> torch.device:
    """The device a reward model runs on: the one given (the run's), the CPU when none is. A CUDA device on a host
    where torch sees no GPU is refused: a scorer silently moved to the CPU would make the run far slower."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--scorer {spec}: asked to run on {device} but torch sees no CUDA GPU here; run on a "
                          "machine with one, or on the CPU (--use_cpu)")
    return device


class RewardModelScorer(Scorer):
    """``AutoModelForSequenceClassification`` scores on ``device``. With ``autocast_dtype`` (the run's mixed
    precision) it runs under that autocast, and its weights are stored in bf16 where that is the dtype and the
    device has native bf16 (:func:`prefkit.accel.precision.bf16_is_fast`); fp32 otherwise."""

    def __init__(self, spec: str, path: str, batch_size: int = 16, max_length: int = 1024, allow_pickle: bool = False,
                 device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from prefkit.accel.precision import bf16_is_fast
        from prefkit.models import check_weights

        self.device = scorer_device(spec, device)
        self.autocast_dtype = autocast_dtype
        native_bf16 = autocast_dtype == torch.bfloat16 and bf16_is_fast(self.device.type)
        check_weights(path, allow_pickle)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=None if allow_pickle else True,
                dtype=torch.bfloat16 if native_bf16 else torch.float32).eval()
        except Exception as e:
            raise ConfigError(f"--scorer {spec}: cannot load a sequence-classification model from {path} "
                              f"({type(e).__name__}: {e})") from e
        self.model.to(self.device)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.spec, self.batch_size, self.max_length = spec, batch_size, max_length

    def _text(self, it: Item) -> str:
        if isinstance(it.prompt, list) and getattr(self.tokenizer, "chat_template", None):
            msgs = it.prompt + [{"role": "assistant", "content": it.completion}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return it.prompt_text + it.completion

    def score(self, items: list[Item]) -> list[float]:
        import torch

        if not items:
            return []
        scores = []
        autocast = self.autocast_dtype
        for start in range(0, len(items), self.batch_size):
            batch = [self._text(it) for it in items[start : start + self.batch_size]]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length)
            enc = {k: v.to(self.device, non_blocking=True) for k, v in enc.items()}
            with torch.no_grad(), torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                scores.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(scores).tolist()  # one host sync for all the batches


def build_scorer(spec: str, *, reference_field: str = "answer", batch_size: int = 16,
                 allow_pickle: bool = False, device: torch.device | str | None = None,
                 autocast_dtype: torch.dtype | None = None) -> Scorer:
    """A scorer from its spec; ConfigError for a bad spec, a bad pattern or an unimportable module. A reward
    model loads from safetensors only unless ``allow_pickle``, and runs on ``device`` (the CPU when None) under
    ``autocast_dtype`` (:class:`RewardModelScorer`)."""
    kind, _, arg = spec.partition(":")
    if kind == "math" and not arg:
        return MathScorer(spec, reference_field)
    if kind == "regex" and arg:
        return RegexScorer(spec, arg, reference_field)
    if kind == "python" and arg:
        return PythonScorer(spec, arg)
    if kind == "reward_model" and arg:
        return RewardModelScorer(spec, arg, batch_size=batch_size, allow_pickle=allow_pickle, device=device,
                                 autocast_dtype=autocast_dtype)
    raise ConfigError(f"--scorer: unknown spec {spec!r}; expected {SPECS}")
