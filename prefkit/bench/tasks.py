"""What each bench task prepares once for all methods: the starting model, train/held-out pairs, and the
held-out questions whose answers are checked after training.

- arithmetic: tiny Llama → SFT until it solves ``sft_target_accuracy`` of validation problems → K samples
  per training problem at temperature 1, labelled by the exact checker → (correct, incorrect) pairs
  (on-policy, as in the ADPO paper's math setting). Held-out pairs come from validation problems; answer
  accuracy and KL are measured on test problems no stage has seen.
- preference: a JSONL(.gz) of pairs split into disjoint train and held-out files (HH-RLHF).
- gsm8k: pairs from ``example_model_solutions.jsonl`` (a correct solution, or the reference when no model
  solution is correct, vs an incorrect one) on questions outside the held-out set; the held-out questions'
  answers are exact-matched.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefkit.bench.config import BenchConfig
from prefkit.configfile import config_from_options
from prefkit.critical_tokens_cli import write_token_weights
from prefkit.errors import ConfigError, DataError
from prefkit.pairs.scorers import final_number


@dataclass
class Setup:
    model_path: str | None  # None: prefkit's embedded default model
    train_file: str
    eval_file: str
    questions: list[str] = field(default_factory=list)  # held-out prompts for answer accuracy / KL
    answers: list = field(default_factory=list)
    val_questions: list[str] = field(default_factory=list)  # what a sweep's point is picked by (never test)
    val_answers: list = field(default_factory=list)
    extract: Callable[[str], object] | None = None
    max_new_tokens: int = 0
    measure_kl: bool = True
    weighted_train_file: str | None = None  # cADPO: the same pairs with token weights
    weighted_eval_file: str | None = None
    notes: list[str] = field(default_factory=list)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _opt(bench: BenchConfig, key: str, default):
    return bench.task_options.get(key, default)


def _data_path(bench: BenchConfig, key: str) -> Path:
    raw = bench.task_options.get(key)
    if not raw:
        raise ConfigError(f"{bench.source}: task_options.{key}: required for task {bench.task}")
    path = Path(raw)
    if not path.exists():
        raise DataError(f"not found (task_options.{key} in {bench.source}; the shared data sits beside the repo)",
                        source=str(path))
    return path


# ---- arithmetic ------------------------------------------------------------------------------------------

def _pairs_from_samples(problems, texts: list[str], k: int, max_pairs: int, rng: random.Random, extract,
                        reference_fallback: bool = False):
    """Up to ``max_pairs`` (correct, incorrect) pairs per problem from its k samples; counts for the report.
    With ``reference_fallback`` a problem with no correct sample pairs its reference solution instead.
    Pairing is prefkit.pairs' ``all`` rule with a random cap (the same code as `prefkit pairs`)."""
    from prefkit.pairs.pairing import FALLBACK, pair_samples

    rows, n_both, n_correct = [], 0, 0
    for i, p in enumerate(problems):
        samples = texts[i * k : (i + 1) * k]
        scores = [float(extract(s) == p.answer) for s in samples]
        n_correct += int(sum(scores))
        got = pair_samples(samples, scores, pairing="all", rng=rng, max_pairs=max_pairs, fallback=reference_fallback)
        if got.pairs:
            n_both += 1
            text = {**dict(enumerate(samples)), FALLBACK: p.solution}
            rows += [{"prompt": p.prompt, "chosen": text[c], "rejected": text[r]} for c, r in got.pairs]
    return rows, n_both, n_correct


def _steps(solution: str) -> tuple[list[str], str]:
    lines = solution.split("\n")
    return lines[:-1], lines[-1]  # worked steps, then the "A:n" line


def pad_solution(solution: str, rng: random.Random, pad_steps: int) -> str:
    """The same solution with ``pad_steps`` of its steps written twice (in place): longer, equally correct."""
    steps, answer = _steps(solution)
    if not steps:
        return solution
    for _ in range(pad_steps):
        i = rng.randrange(len(steps))
        steps.insert(i, steps[i])
    return "\n".join(steps + [answer])


STEP = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")


def slip_solution(solution: str, rng: random.Random) -> str:
    """A near-duplicate with one arithmetic slip: one step's result is off by 1–3 and the later steps carry
    the wrong value on consistently, so the final answer is wrong and only the tail from that step differs."""
    steps, _ = _steps(solution)
    parsed = [STEP.match(s) for s in steps]
    if not steps or not all(parsed):
        return solution
    i = rng.randrange(len(steps))
    out, acc = steps[:i], int(parsed[i].group(1))
    for j in range(i, len(steps)):
        _, op, n, _ = parsed[j].groups()
        new = acc + int(n) if op == "+" else acc - int(n)
        if j == i:
            new += rng.choice([-3, -2, -1, 1, 2, 3])
        out.append(f"{acc}{op}{n}={new}")
        acc = new
    return "\n".join(out + [f"A:{acc}"])


PAIR_VARIANTS = ("onpolicy", "pad_chosen", "pad_rejected", "near_duplicate")


def apply_variant(rows: list[dict], variant: str, rng: random.Random, pad_steps: int) -> list[dict]:
    """Task variants where one mechanism has something to act on (docs/bench.md): a systematic length gap
    (POET) or near-duplicate pairs that differ from one step on (likelihood displacement, RC)."""
    if variant == "onpolicy":
        return rows
    if variant == "near_duplicate":  # one pair per distinct chosen solution: a slip of it is the rejected
        seen, out = set(), []
        for r in rows:
            if (r["prompt"], r["chosen"]) not in seen:
                seen.add((r["prompt"], r["chosen"]))
                out.append({**r, "rejected": slip_solution(r["chosen"], rng)})
        return out
    side = "chosen" if variant == "pad_chosen" else "rejected"
    return [{**r, side: pad_solution(r[side], rng, pad_steps)} for r in rows]


def _finetune_copy(model_path: str, tokenizer, problems_and_solutions, out: Path, steps: int, seed: int) -> str:
    """A copy of the SFT model trained a few steps on given solutions (cADPO's positive/negative models)."""
    from transformers import AutoModelForCausalLM

    from prefkit.bench.arithmetic import Problem
    from prefkit.bench.sft import sft_until

    model = AutoModelForCausalLM.from_pretrained(model_path)
    items = [Problem(prompt=p, solution=s, answer=0) for p, s in problems_and_solutions]
    sft_until(model, tokenizer, items, [], output_dir=str(out), target_accuracy=2.0, max_steps=steps,
              eval_steps=steps + 1, batch_size=32, learning_rate=1e-4, seed=seed, max_new_tokens=1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _critical_weights(setup: Setup, work: Path, bench: BenchConfig,
                      finetune: Callable[[str, Path, int], str]) -> tuple[str, str]:
    """cADPO weights for the train and held-out pairs: contrastive estimation with copies of the starting model
    tuned on the training pairs' chosen (positive) and rejected (negative) responses.
    ``finetune(side, out_dir, seed)`` makes one copy and returns its directory."""
    pos = finetune("chosen", work / "critical_pos", 1)
    neg = finetune("rejected", work / "critical_neg", 2)
    outs = []
    for src in (setup.train_file, setup.eval_file):
        out = work / Path(src).name.replace(".jsonl", "_weighted.jsonl")
        lengths = {k: bench.train[k] for k in ("max_length", "max_prompt_length") if k in bench.train}
        cfg = config_from_options({"dataset_name": src, "output_dir": str(out.parent), **lengths})
        write_token_weights(cfg, pos, neg, out, batch_size=int(_opt(bench, "critical_batch_size", 64)))
        outs.append(str(out))
    return outs[0], outs[1]


def _arithmetic_sft(bench: BenchConfig, work: Path, splits: dict, tokenizer, max_new: int) -> Path:
    """The SFT starting model's folder: trained here until its validation accuracy target (reused when present),
    or another arithmetic bench's (``task_options.sft_from``)."""
    from prefkit.bench.arithmetic import make_model
    from prefkit.bench.sft import sft_until

    o = bench.task_options
    sft_dir = work / "sft"
    if o.get("sft_from"):  # another arithmetic bench's SFT model (same task options): trained once, shared
        sft_dir = work.parent.parent / str(o["sft_from"]) / "setup" / "sft"
        if not (sft_dir / "config.json").is_file():
            raise ConfigError(f"{bench.source}: task_options.sft_from: no SFT model at {sft_dir}; run "
                              f"`prefkit bench` on the {o['sft_from']} config first")
        work.mkdir(parents=True, exist_ok=True)
        if (sft_dir.parent / "sft_history.json").is_file() and not (work / "sft_history.json").is_file():
            (work / "sft_history.json").write_text((sft_dir.parent / "sft_history.json").read_text())
    if not (sft_dir / "config.json").is_file():
        torch.manual_seed(int(o.get("model_seed", 0)))
        model = make_model(tokenizer, hidden_size=int(o.get("hidden_size", 192)), num_layers=int(o.get("num_layers", 4)),
                           num_heads=int(o.get("num_heads", 4)))
        history = sft_until(
            model, tokenizer, splits["sft"], splits["val"], output_dir=str(work / "sft_tmp"),
            target_accuracy=float(o.get("sft_target_accuracy", 0.4)), max_steps=int(o.get("sft_max_steps", 3000)),
            eval_steps=int(o.get("sft_eval_steps", 250)), batch_size=int(o.get("sft_batch_size", 64)),
            learning_rate=float(o.get("sft_learning_rate", 1e-3)), seed=0, max_new_tokens=max_new,
        )
        model.save_pretrained(sft_dir)
        tokenizer.save_pretrained(sft_dir)
        (work / "sft_history.json").write_text(json.dumps(history))
    return sft_dir


def weights_digest(model: torch.nn.Module) -> str:
    """The first 16 hex digits of a sha256 over every parameter and buffer (by name, in name order): which
    starting model a section's runs used. The model is not committed, and training it again need not give the
    same one (a rebuild in a fresh checkout did not: docs/bench.md), so the digest tells a rebuilt model from
    the one the runs saw."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_arithmetic(bench: BenchConfig, work: Path) -> Setup:
    from prefkit.bench.arithmetic import extract_answer, make_splits, make_tokenizer
    from prefkit.bench.generate import generate
    from prefkit.bench.sft import accuracy

    o = bench.task_options
    sizes = {"sft": int(o.get("sft_problems", 20000)), "pref": int(o.get("pref_problems", 1000)),
             "val": int(o.get("val_problems", 200)), "test": int(o.get("test_problems", 500))}
    splits = make_splits(int(o.get("data_seed", 0)), sizes, int(o.get("num_terms", 3)), int(o.get("digits", 2)))
    max_new = int(o.get("max_new_tokens", 48))
    tokenizer = make_tokenizer()
    notes: list[str] = []
    variant = str(o.get("pair_variant", "onpolicy"))
    if variant not in PAIR_VARIANTS:
        raise ConfigError(f"{bench.source}: task_options.pair_variant: must be one of {', '.join(PAIR_VARIANTS)}, "
                          f"got {variant!r}")
    sft_dir = _arithmetic_sft(bench, work, splits, tokenizer, max_new)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    n_params = sum(p.numel() for p in model.parameters())
    history = json.loads((work / "sft_history.json").read_text()) if (work / "sft_history.json").is_file() else []
    test_acc = accuracy(model, tokenizer, splits["test"], max_new_tokens=max_new)
    notes.append(f"tiny Llama, {n_params / 1e6:.2f} M parameters, character tokenizer ({len(tokenizer)} tokens)")
    if history:
        notes.append(f"SFT: {history[-1][0]} steps on {sizes['sft']} problems; validation accuracy "
                     f"{100 * history[-1][1]:.1f}%, held-out test accuracy {100 * test_acc:.1f}%")
    notes.append(f"SFT weights: sha256 {weights_digest(model)} (over parameters and buffers)")

    k = int(o.get("samples_per_problem", 8))
    temperature = float(o.get("sample_temperature", 1.0))
    torch.manual_seed(int(o.get("sample_seed", 0)))
    rng = random.Random(int(o.get("sample_seed", 0)))
    files = {}
    for split, name in (("pref", "pairs.jsonl"), ("val", "eval_pairs.jsonl")):
        probs = splits[split]
        gens = generate(model, tokenizer, [p.prompt for p in probs], max_new_tokens=max_new, batch_size=256,
                        do_sample=True, temperature=temperature, num_return_sequences=k)
        rows, n_both, n_correct = _pairs_from_samples(probs, gens.texts, k, int(o.get("pairs_per_problem", 2)),
                                                      rng, extract_answer, bool(o.get("reference_fallback", False)))
        rows = apply_variant(rows, variant, random.Random(int(o.get("sample_seed", 0)) + 1), int(o.get("pad_steps", 2)))
        files[split] = _write_jsonl(work / name, rows)
        notes.append(f"{split} problems: {len(probs)}, {k} samples each at T={temperature}: "
                     f"{100 * n_correct / (k * len(probs)):.1f}% correct; {n_both} problems with both a correct "
                     f"and an incorrect sample → {len(rows)} pairs")
        if variant != "onpolicy":
            notes.append(f"{split} pairs: variant {variant}: {_length_gap_note(rows)}")
    setup = Setup(
        model_path=str(sft_dir), train_file=files["pref"], eval_file=files["val"],
        questions=[p.prompt for p in splits["test"]], answers=[p.answer for p in splits["test"]],
        val_questions=[p.prompt for p in splits["val"]], val_answers=[p.answer for p in splits["val"]],
        extract=extract_answer, max_new_tokens=max_new, notes=notes,
    )
    if bench.uses_critical_tokens():
        pairs = [json.loads(line) for line in open(setup.train_file)]
        steps = int(_opt(bench, "critical_model_steps", 200))

        def finetune(side: str, out: Path, seed: int) -> str:
            return _finetune_copy(setup.model_path, tokenizer, [(r["prompt"], r[side]) for r in pairs], out, steps,
                                  seed)

        setup.weighted_train_file, setup.weighted_eval_file = _critical_weights(setup, work, bench, finetune)
    return setup


def flat_rejected_weights(src: str) -> str:
    """The cADPO control's data: the weighted pairs with every chosen weight 1 and every rejected token weighted
    by its response's mean critical-token weight, so the rejected side shrinks as much as cADPO's on average
    but with no position. Written once beside ``src`` (``*_flat.jsonl``); deterministic in ``src``."""
    out = Path(src).with_name(Path(src).name.replace(".jsonl", "_flat.jsonl"))
    rows = [json.loads(line) for line in open(src)]
    for r in rows:
        w = r["rejected_token_weights"]
        r["chosen_token_weights"] = [1.0] * len(r["chosen_token_weights"])
        r["rejected_token_weights"] = [sum(w) / len(w)] * len(w) if w else []
    return _write_jsonl(out, rows)


def _length_gap_note(rows: list[dict]) -> str:
    if not rows:
        return "no pairs"
    gap = [len(r["chosen"]) - len(r["rejected"]) for r in rows]
    equal = sum(g == 0 for g in gap) / len(gap)
    return (f"chosen − rejected length {sum(gap) / len(gap):+.1f} characters on average, equal length in "
            f"{100 * equal:.0f}% of pairs")


# ---- preference (HH-RLHF) ----------------------------------------------------------------------------------

def _read_jsonl_any(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _finetune_lora_copy(bench: BenchConfig, setup: Setup, side: str, out: Path, seed: int) -> str:
    """A copy of the starting model tuned on the training pairs' ``side`` responses (loss on the response
    tokens, tokenized exactly as training tokenizes them): LoRA as the cDPO authors' positive/negative models
    (r=8 on the MLP projections, lr 3e-4, one epoch; Critical-Tokens-Matter src/configs/train_config.py),
    merged into the weights so `prefkit critical-tokens` loads it as a plain model. Reused when present."""
    if (out / "config.json").is_file():
        return str(out)
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from prefkit.data import load_rows, prepare_dataset
    from prefkit.models import apply_lora, load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(setup.model_path)
    tokenizer = load_tokenizer(path)
    lengths = {k: bench.train[k] for k in ("max_length", "max_prompt_length") if k in bench.train}
    cfg = config_from_options({**lengths, "output_dir": str(out)})
    ds, _ = prepare_dataset(load_rows(setup.train_file, "train"), tokenizer, cfg, source=setup.train_file)
    ids = [p + r for p, r in zip(ds["prompt_ids"], ds[f"{side}_ids"])]
    labels = [[-100] * len(p) + r for p, r in zip(ds["prompt_ids"], ds[f"{side}_ids"])]
    torch.manual_seed(seed)
    model = apply_lora(load_causal_lm(path), r=8, alpha=16, dropout=0.0,
                       target_modules=["gate_proj", "up_proj", "down_proj"])
    args = TrainingArguments(
        output_dir=str(out / "tmp"), num_train_epochs=float(_opt(bench, "critical_model_epochs", 1)),
        per_device_train_batch_size=int(_opt(bench, "critical_model_batch_size", 8)),
        learning_rate=float(_opt(bench, "critical_model_learning_rate", 3e-4)), lr_scheduler_type="constant",
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False, disable_tqdm=True, logging_steps=10**9,
    )
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": labels}),
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)).train()
    model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def prepare_preference(bench: BenchConfig, work: Path) -> Setup:
    rows = _read_jsonl_any(_data_path(bench, "data"))
    n_train, n_eval = int(_opt(bench, "train_pairs", 256)), int(_opt(bench, "eval_pairs", 64))
    if n_train + n_eval > len(rows):
        raise ConfigError(f"{bench.source}: task_options: train_pairs + eval_pairs = {n_train + n_eval} exceeds "
                          f"the {len(rows)} pairs in {bench.task_options['data']}")
    # held-out pairs are the file's last rows: disjoint from training, fixed across methods and seeds
    train = _write_jsonl(work / "train.jsonl", rows[:n_train])
    held = _write_jsonl(work / "eval.jsonl", rows[len(rows) - n_eval :])
    setup = Setup(model_path=bench.task_options.get("model"), train_file=train, eval_file=held,
                  notes=[f"{n_train} training pairs (first rows) and {n_eval} held-out pairs (last rows) of "
                         f"{Path(bench.task_options['data']).name}"])
    if bench.uses_critical_tokens():
        setup.weighted_train_file, setup.weighted_eval_file = _critical_weights(
            setup, work, bench, lambda side, out, seed: _finetune_lora_copy(bench, setup, side, out, seed))
        setup.notes.append("cADPO weights: positive / negative models = LoRA copies (r=8, MLP projections) of the "
                           "starting model tuned one epoch at lr 3e-4 on the training pairs' chosen / rejected "
                           "responses (the cDPO authors' settings)")
    return setup


# ---- GSM8K -----------------------------------------------------------------------------------------------

def gsm8k_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{question}\nSolve it step by step and end with 'A: <number>'."}]


def prepare_gsm8k(bench: BenchConfig, work: Path) -> Setup:
    from prefkit.models import load_tokenizer, resolve_model_path

    rows = _read_jsonl_any(_data_path(bench, "solutions"))
    n_eval = int(_opt(bench, "eval_questions", 50))
    per_q = int(_opt(bench, "pairs_per_question", 1))
    max_q = int(_opt(bench, "train_questions", 400))
    held, pool = rows[len(rows) - n_eval :], rows[: len(rows) - n_eval]
    rng = random.Random(0)
    pairs, used = [], 0
    for r in pool:
        sols = [v for v in r.values() if isinstance(v, dict) and "is_correct" in v]
        good = [s["solution"] for s in sols if s["is_correct"]] or [r["ground_truth"]]
        bad = [s["solution"] for s in sols if not s["is_correct"]]
        if not bad:
            continue
        combos = list(itertools.product(dict.fromkeys(good), dict.fromkeys(bad)))
        rng.shuffle(combos)
        for c, b in combos[:per_q]:
            pairs.append({"prompt": gsm8k_prompt(r["question"]), "chosen": [{"role": "assistant", "content": c}],
                          "rejected": [{"role": "assistant", "content": b}]})
        used += 1
        if used >= max_q:
            break
    n_eval_pairs = int(_opt(bench, "eval_pairs", 32))
    train = _write_jsonl(work / "train.jsonl", pairs[: len(pairs) - n_eval_pairs])
    evalp = _write_jsonl(work / "eval.jsonl", pairs[len(pairs) - n_eval_pairs :])
    tokenizer = load_tokenizer(resolve_model_path(bench.task_options.get("model")))
    questions = [tokenizer.apply_chat_template(gsm8k_prompt(r["question"]), tokenize=False, add_generation_prompt=True)
                 for r in held]
    return Setup(
        model_path=bench.task_options.get("model"), train_file=train, eval_file=evalp, questions=questions,
        answers=[final_number(r["ground_truth"]) for r in held], extract=final_number,
        max_new_tokens=int(_opt(bench, "max_new_tokens", 256)), measure_kl=bool(_opt(bench, "measure_kl", True)),
        notes=[f"{len(pairs) - n_eval_pairs} training pairs and {n_eval_pairs} held-out pairs from {used} GSM8K test "
               f"questions outside the {n_eval} held-out questions (the file's last rows)"],
    )


PREPARE: dict[str, Callable[[BenchConfig, Path], Setup]] = {
    "arithmetic": prepare_arithmetic, "preference": prepare_preference, "gsm8k": prepare_gsm8k,
}
