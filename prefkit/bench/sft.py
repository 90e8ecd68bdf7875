"""Supervised fine-tuning of the bench's tiny model until it solves a target share of validation problems.

The SFT model is the starting policy and the reference of every preference run, as in the ADPO paper's
setup (SFT → on-policy pairs → preference training). Uses transformers' Trainer; only the loop's stopping
rule is ours: every ``eval_steps`` the model answers the validation problems greedily and training stops once
its accuracy reaches ``target_accuracy`` (or at ``max_steps``).
"""

from __future__ import annotations

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from prefkit.bench.arithmetic import Problem, extract_answer
from prefkit.bench.generate import generate


def tokenize_sft(problems: list[Problem], tokenizer) -> Dataset:
    """input_ids = BOS + prompt + solution + EOS; labels mask the prompt (loss on the solution only)."""
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for p in problems:
        prompt = tokenizer(p.prompt).input_ids
        answer = tokenizer(p.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows["input_ids"].append(prompt + answer)
        rows["labels"].append([-100] * len(prompt) + answer)
    return Dataset.from_dict(rows)


def accuracy(model, tokenizer, problems: list[Problem], *, max_new_tokens: int, batch_size: int = 256) -> float:
    gens = generate(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
    return sum(extract_answer(t) == p.answer for t, p in zip(gens.texts, problems)) / max(len(problems), 1)


class _StopAtAccuracy(TrainerCallback):
    def __init__(self, tokenizer, problems: list[Problem], target: float, max_new_tokens: int):
        self.tokenizer, self.problems, self.target, self.max_new_tokens = tokenizer, problems, target, max_new_tokens
        self.history: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % args.eval_steps == 0:
            acc = accuracy(model, self.tokenizer, self.problems, max_new_tokens=self.max_new_tokens)
            self.history.append((state.global_step, acc))
            print(f"  SFT step {state.global_step}: validation accuracy {100 * acc:.1f}%", flush=True)
            if acc >= self.target:
                control.should_training_stop = True
        return control


def sft_until(model, tokenizer, train: list[Problem], val: list[Problem], *, output_dir: str, target_accuracy: float,
              max_steps: int, eval_steps: int, batch_size: int, learning_rate: float, seed: int,
              max_new_tokens: int) -> list[tuple[int, float]]:
    """Train in place; returns the (step, validation accuracy) history."""
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=min(100, max_steps // 10),
        weight_decay=0.0, logging_steps=eval_steps, eval_steps=eval_steps, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True,
    )
    stop = _StopAtAccuracy(tokenizer, val, target_accuracy, max_new_tokens)
    Trainer(
        model=model, args=args, train_dataset=tokenize_sft(train, tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), callbacks=[stop],
    ).train()
    return stop.history
