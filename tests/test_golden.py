"""The golden run: loss, rewards and grad norm at steps 1-3 of a seeded tiny DPO run, against numbers committed
in tests/golden/. Two runs of today's code agreeing catches nothing; this catches any change of the numbers.

A deliberate change of the numbers (a fixed formula, another default) is committed by regenerating them:
    PREFKIT_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py
and saying why in the commit message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.test_train_e2e import write_pairs

GOLDEN = Path(__file__).parent / "golden"
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
# fp32 on CPU: sums in another order (thread count, kernels of another torch build) move the 7th digit
TOLERANCE = dict(rel=1e-4, abs=1e-6)

RUNS = {
    "dpo": {},
    "adpo_adaptive_poet": {"granularity": "adaptive", "num_segments": 2, "poet": True},
}


def _run(tmp_path: Path, tokenizer, extra: dict) -> dict[str, dict[str, float]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefkit import PrefConfig, PrefTrainer
    from tests.conftest import _small

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_small(len(tokenizer))))
    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 12).read_text().splitlines()]
    args = PrefConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                      learning_rate=5e-3, seed=7, use_cpu=True, bf16=False, report_to="none", max_length=64,
                      dynamics_steps=0, save_strategy="no", **extra)
    PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer).train()
    recs = [json.loads(ln) for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): {k: r[k] for k in KEYS} for r in recs if "loss" in r}


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_run_matches_committed_numbers(tmp_path, tiny_tokenizer, name):
    got = _run(tmp_path, tiny_tokenizer, RUNS[name])
    path = GOLDEN / f"{name}.json"
    if os.environ.get("PREFKIT_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert sorted(got) == sorted(want) == ["1", "2", "3"]
    for step, values in want.items():
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, **TOLERANCE), (step, key)
