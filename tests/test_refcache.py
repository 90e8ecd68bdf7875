"""The reference log-prob cache key: every property of the reference that changes its log-probs makes a new
entry, so a stale cache never gives wrong rewards."""

from __future__ import annotations

import copy
import json

import torch
from datasets import Dataset

from prefkit.config import PrefConfig
from prefkit.data import prepare_dataset
from prefkit.models import apply_lora
from prefkit.refcache import attach_reference_logps
from tests.test_train_e2e import write_pairs


def test_each_reference_property_makes_its_own_cache_entry(tmp_path, tiny_llama, tiny_tokenizer):
    cache = tmp_path / "cache"
    cfg = PrefConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", max_length=64,
                     ref_cache_dir=str(cache), bf16=False)
    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 4).read_text().splitlines()]
    ds, _ = prepare_dataset(Dataset.from_list(rows), tiny_tokenizer, cfg, source="p")
    name = str(tmp_path / "no-such-dir")  # a hub id: its identity is the name (and the revision)

    def entries(model) -> int:
        attach_reference_logps(ds, model, tiny_tokenizer, cfg, model_path=name)
        return len(list(cache.iterdir()))

    assert entries(tiny_llama) == 1
    assert entries(tiny_llama) == 1  # same reference: a hit
    assert entries(copy.deepcopy(tiny_llama).to(torch.bfloat16)) == 2  # weight dtype (a bf16 LoRA base)
    peft = apply_lora(copy.deepcopy(tiny_llama), r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    assert entries(peft) == 3  # adapter-disabled peft model
    revised = copy.deepcopy(tiny_llama)
    revised.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"  # another hub revision
    assert entries(revised) == 4
