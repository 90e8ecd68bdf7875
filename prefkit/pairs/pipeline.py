"""Sample → score → pair for a list of prompt rows; the shared engine of `prefkit pairs`, ``--rounds`` and the
bench's arithmetic task."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefkit.data.load import ROW
from prefkit.errors import DataError
from prefkit.pairs.pairing import FALLBACK, PAIRINGS, pair_samples
from prefkit.pairs.sample import VLLM_GPU_MEMORY_UTILIZATION, Generations, generate, generate_vllm
from prefkit.pairs.scorers import Item, Scorer


@dataclass
class SampleOptions:
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16  # prompts per generate call (each expands to num_samples rows)
    backend: str = "hf"
    apply_chat_template: str = "auto"  # auto: when the tokenizer has one | true | false
    vllm_gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION
    vllm_dtype: str = "auto"  # vLLM's dtype: auto (the checkpoint's) | bfloat16 | float16 | float32


@dataclass
class PairOptions:
    pairing: str = "best_worst"
    max_pairs_per_prompt: int | None = None
    correct_threshold: float = 1.0  # a sample is "correct" when its score is at least this
    reference_fallback: str | None = None  # field with a reference solution, chosen when no sample is correct


@dataclass
class Summary:
    prompts: int = 0
    empty_prompts_skipped: int = 0
    samples: int = 0
    nan_dropped: int = 0
    duplicates: int = 0
    correct: int = 0
    prompts_with_pair: int = 0
    pairs: int = 0
    tied_pairs: int = 0
    reference_fallbacks: int = 0
    score_histogram: dict = field(default_factory=dict)
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    backend: str = "hf"

    @property
    def share_correct(self) -> float:
        """Correct samples among the scored ones (NaN-scored samples are not scored)."""
        return self.correct / max(self.samples - self.nan_dropped, 1)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of generation wall time."""
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "share_correct": self.share_correct, "tokens_per_second": self.tokens_per_second}

    def text(self) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in self.score_histogram.items())
        return "\n".join([
            f"prompts: {self.prompts}, samples: {self.samples} ({self.nan_dropped} NaN-scored dropped, "
            f"{self.duplicates} duplicates merged)"
            + (f"; empty prompts skipped: {self.empty_prompts_skipped}" if self.empty_prompts_skipped else ""),
            f"correct samples: {self.correct} ({100 * self.share_correct:.1f}% of scored)",
            f"prompts with at least one pair: {self.prompts_with_pair}; pairs: {self.pairs}; tied pairs dropped: "
            f"{self.tied_pairs}" + (f"; reference fallbacks: {self.reference_fallbacks}" if self.reference_fallbacks
                                    else ""),
            f"score histogram: {hist}",
            f"generation: {self.generated_tokens} tokens in {self.generation_seconds:.1f} s = "
            f"{self.tokens_per_second:.1f} tokens/s ({self.backend})",
        ])


def histogram(scores: list[float], bins: int = 10) -> dict[str, int]:
    """Exact counts when there are few distinct scores (checkers), else ``bins`` equal-width bins."""
    finite = [s for s in scores if not math.isnan(s)]
    distinct = sorted(set(finite))
    if len(distinct) <= bins:
        counts = Counter(finite)
        return {f"{v:g}": counts[v] for v in distinct}
    lo, hi = distinct[0], distinct[-1]
    width = (hi - lo) / bins
    counts = Counter(min(int((s - lo) / width), bins - 1) for s in finite)
    return {f"[{lo + b * width:.3g}, {lo + (b + 1) * width:.3g})": counts[b] for b in range(bins)}


def _empty_prompt(p: object) -> bool:
    """A prompt with no text: an empty or blank string, or messages whose contents are all blank."""
    if isinstance(p, str):
        return not p.strip()
    if isinstance(p, list):
        return all(isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip() for m in p)
    return False


def render_prompts(rows: list[dict], tokenizer, *, prompt_field: str, chat: str, source: str) -> tuple[list, list[str]]:
    """(prompts as written out, texts the model continues). Messages always go through the chat template;
    text prompts do too for a model with one (``chat`` auto/true), becoming a single user message."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat == "true" and not has_template:
        raise DataError("--apply_chat_template true: the tokenizer has no chat template", source=source)
    shown, texts = [], []
    for r in rows:
        p = r.get(prompt_field)
        row_no = r.get(ROW, -1)
        if isinstance(p, str):
            if has_template and chat in ("auto", "true"):
                p = [{"role": "user", "content": p}]
            else:
                shown.append(p)
                texts.append(p)
                continue
        if not isinstance(p, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            got = "null" if p is None else type(p).__name__
            raise DataError(f"expected a text prompt or a list of {{role, content}} messages, got {got}",
                            source=source, row=row_no, field=prompt_field)
        if not has_template:
            raise DataError("a conversational prompt needs a tokenizer with a chat template", source=source,
                            row=row_no, field=prompt_field)
        shown.append(p)
        texts.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
    return shown, texts


def sample(model, tokenizer, texts: list[str], opts: SampleOptions, model_path: str | None = None) -> Generations:
    """``num_samples`` completions per prompt text, prompt-major. Seeds torch's RNG with ``opts.seed``. vLLM
    loads the model from ``model_path`` (the model's own path when None)."""
    from transformers import set_seed

    set_seed(opts.seed)
    if opts.backend == "vllm":
        return generate_vllm(model_path or model.name_or_path, tokenizer, texts, max_new_tokens=opts.max_new_tokens,
                             temperature=opts.temperature, top_p=opts.top_p, num_return_sequences=opts.num_samples,
                             seed=opts.seed, gpu_memory_utilization=opts.vllm_gpu_memory_utilization,
                             dtype=opts.vllm_dtype)
    return generate(model, tokenizer, texts, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                    do_sample=opts.temperature > 0, temperature=opts.temperature or 1.0, top_p=opts.top_p,
                    num_return_sequences=opts.num_samples)


def score_and_pair(
    rows: list[dict], shown: list, texts: list[str], completions: list[str], scorer: Scorer, k: int,
    popts: PairOptions, *, rng: random.Random, source: str = "", provenance: dict | None = None,
) -> tuple[list[dict], Summary]:
    """Score ``k`` completions per prompt and pair them; rows in the standard (prompt, chosen, rejected)
    format (conversational when the prompt is messages) plus provenance fields."""
    if popts.pairing not in PAIRINGS:
        raise DataError(f"--pairing must be one of {', '.join(PAIRINGS)}, got {popts.pairing!r}")
    items = [Item(shown[i], texts[i], completions[i * k + j], rows[i], rows[i].get(ROW, i), source)
             for i in range(len(rows)) for j in range(k)]
    scores = scorer.score(items)
    out: list[dict] = []
    s = Summary(prompts=len(rows), samples=len(items), score_histogram=histogram(scores))
    s.nan_dropped = sum(math.isnan(x) for x in scores)
    s.correct = sum(not math.isnan(x) and x >= popts.correct_threshold for x in scores)
    for i, row in enumerate(rows):
        comp, sc = completions[i * k : (i + 1) * k], scores[i * k : (i + 1) * k]
        fallback = popts.reference_fallback
        got = pair_samples(comp, sc, pairing=popts.pairing, rng=rng, max_pairs=popts.max_pairs_per_prompt,
                           fallback=fallback is not None, correct=popts.correct_threshold)
        s.tied_pairs += got.tied_pairs
        s.duplicates += got.duplicates
        s.reference_fallbacks += got.used_fallback
        s.prompts_with_pair += bool(got.pairs)
        for a, b in got.pairs:
            text = {j: comp[j] for j in (a, b) if j != FALLBACK}
            if FALLBACK in (a, b):
                if row.get(fallback) is None:
                    raise DataError(f"--reference_fallback: the row has no reference solution in {fallback!r}",
                                    source=source or None, row=row.get(ROW, i), field=fallback)
                text[FALLBACK] = str(row[fallback])
            chat = isinstance(shown[i], list)
            pair = {"prompt": shown[i],
                    "chosen": [{"role": "assistant", "content": text[a]}] if chat else text[a],
                    "rejected": [{"role": "assistant", "content": text[b]}] if chat else text[b]}
            if provenance is not None:
                pair.update(chosen_score=sc[a] if a != FALLBACK else None, rejected_score=sc[b],
                            chosen_index=a, rejected_index=b, prompt_row=row.get(ROW, i), **provenance)
            out.append(pair)
    s.pairs = len(out)
    return out, s


def write_outputs(pairs: list[dict], summary: Summary, output: str) -> Path:
    """The pairs as JSONL and the summary beside them (``<output>.summary.json``); returns the summary path."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in pairs:
            f.write(json.dumps(r) + "\n")
    summary_path = path.with_name(path.name + ".summary.json")
    summary_path.write_text(json.dumps(summary.to_dict(), indent=2))
    return summary_path


def make_pairs(
    model, tokenizer, rows: list[dict], scorer: Scorer, sopts: SampleOptions, popts: PairOptions, *,
    prompt_field: str = "prompt", source: str = "", model_name: str | None = None,
    rng: random.Random | None = None, model_path: str | None = None,
) -> tuple[list[dict], Summary]:
    """Render the prompts, sample ``num_samples`` completions each, score, pair; pairs carry provenance
    (``model_name``). vLLM loads the weights from ``model_path`` (else ``model_name``). Empty prompts are skipped
    and counted (a model continuing nothing makes no preference data)."""
    kept = [r for r in rows if not _empty_prompt(r.get(prompt_field))]
    if rows and not kept:
        raise DataError(f"every prompt is empty ({len(rows)} rows)", source=source or None, field=prompt_field)
    empty, rows = len(rows) - len(kept), kept
    shown, texts = render_prompts(rows, tokenizer, prompt_field=prompt_field, chat=sopts.apply_chat_template,
                                  source=source)
    gens = sample(model, tokenizer, texts, sopts, model_path=model_path or model_name)
    provenance = {"model": model_name, "seed": sopts.seed, "scorer": scorer.spec}
    pairs, summary = score_and_pair(rows, shown, texts, gens.texts, scorer, sopts.num_samples, popts,
                                    rng=rng if rng is not None else random.Random(sopts.seed), source=source,
                                    provenance=provenance)
    summary.empty_prompts_skipped = empty
    summary.generated_tokens = sum(gens.num_tokens)
    summary.generation_seconds = gens.seconds
    summary.backend = sopts.backend
    return pairs, summary
