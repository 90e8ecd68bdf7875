"""A PairBatch on its way to the device: pinned by the DataLoader's pin-memory logic, copied without blocking, and
the shared-prompt mask described by lengths in the collator and built densely where the forward runs.

Without CUDA (these tests run on CPU) real page-locked memory cannot be asked for: the pinning test checks the
call path (the DataLoader's pin-memory logic reaches PairBatch.pin_memory, which pins every tensor) with
``torch.accelerator.is_available`` and ``Tensor.pin_memory`` stood in for; an actual pinned, overlapped copy is
not tested here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as torch_pin_memory

from prefkit.data import PairCollator
from prefkit.data.types import PairBatch, SharedMask

FEATS = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "row_id": 0},
         {"prompt_ids": [10], "chosen_ids": [11, 12, 13], "rejected_ids": [14, 15], "row_id": 1}]


def _tensors(batch: PairBatch) -> dict[str, torch.Tensor]:
    out = {}
    for name in batch.__dataclass_fields__:
        v = getattr(batch, name)
        if isinstance(v, SharedMask):
            out[name + ".lengths"] = v.lengths
        elif isinstance(v, torch.Tensor):
            out[name] = v
    return out


def _equal(a: PairBatch, b: PairBatch) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and a.segments == b.segments


@pytest.mark.parametrize("layout", [{}, {"share_prompt": True}, {"share_prompt": True, "pack_pairs": True}],
                         ids=["plain", "shared", "packed"])
def test_torch_pin_memory_pins_every_tensor_where_an_accelerator_exists(monkeypatch, layout):
    batch = PairCollator(pad_token_id=0, **layout)(FEATS)
    # CPU only: the DataLoader's pin-memory logic reaches the method and gets an equal batch back
    assert not torch.accelerator.is_available()
    same = torch_pin_memory(batch)
    assert isinstance(same, PairBatch) and _equal(same, batch)
    # with an accelerator (simulated): every tensor, the shared mask's lengths included, goes through pin_memory
    pinned = []

    def fake_pin(t, device=None):
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = torch_pin_memory(batch)
    assert isinstance(out, PairBatch) and _equal(out, batch)
    want = _tensors(batch)
    assert len(pinned) == len(want) and all(any(p is t for p in pinned) for t in want.values())
    assert all(not any(t is u for u in want.values()) for t in _tensors(out).values())  # the pinned copies


def test_to_copies_every_tensor_without_blocking_and_the_trainer_asks_for_it(monkeypatch):
    from prefkit.trainer import PrefTrainer

    batch = PairCollator(pad_token_id=0, share_prompt=True)(FEATS)
    calls = []
    real = torch.Tensor.to

    def spy(t, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    moved = PrefTrainer._prepare_inputs(SimpleNamespace(args=SimpleNamespace(device=torch.device("cpu"))), batch)
    assert _equal(moved, batch) and isinstance(moved.attention_mask, SharedMask)
    assert calls and all(c is True for c in calls) and len(calls) == len(_tensors(batch))


NEG = torch.finfo(torch.float32).min


def _allowed(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[ch == "x" for ch in r] for r in rows])


def test_shared_mask_is_built_from_lengths_as_worked_out_by_hand():
    """One pair, prompt 2, chosen 2, rejected 1, in a row of 6 (one padding token): the rejected token sees the
    prompt and itself, not the chosen tokens; the padding token sees itself only. With a window of 2 (positions
    0 1 2 3 2 0) each query keeps the keys less than 2 logical positions behind it."""
    batch = PairCollator(pad_token_id=0, share_prompt=True, pad_to_multiple_of=6)(
        [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "row_id": 0}])
    mask = batch.attention_mask
    assert isinstance(mask, SharedMask) and mask.lengths.tolist() == [[2, 2, 1]] and mask.width == 6
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0]]
    full = _allowed(["x.....", "xx....", "xxx...", "xxxx..", "xx..x.", ".....x"])
    dense = mask.dense(batch.position_ids, torch.float32)
    assert dense.shape == (1, 1, 6, 6) and dense.dtype == torch.float32
    torch.testing.assert_close(dense[0, 0], torch.zeros(6, 6).masked_fill(~full, NEG), rtol=0, atol=0)
    win = _allowed(["x.....", "xx....", ".xx...", "..xx..", ".x..x.", ".....x"])
    typed = SharedMask(mask.lengths, 6, window=2, mask_types=("full_attention", "sliding_attention"))
    both = typed.dense(batch.position_ids, torch.bfloat16)
    assert set(both) == {"full_attention", "sliding_attention"} and both["full_attention"].dtype == torch.bfloat16
    bf_min = torch.finfo(torch.bfloat16).min
    assert torch.equal(both["full_attention"][0, 0], torch.zeros(6, 6, dtype=torch.bfloat16).masked_fill(~full, bf_min))
    assert torch.equal(both["sliding_attention"][0, 0],
                       torch.zeros(6, 6, dtype=torch.bfloat16).masked_fill(~win, bf_min))


def test_the_collator_builds_no_square_mask():
    """What the collator ships for the shared prompt is O(rows) integers, not a (rows, 1, W, W) mask."""
    batch = PairCollator(pad_token_id=0, share_prompt=True, pad_to_multiple_of=64)(FEATS)
    width = batch.input_ids.shape[1]
    assert width == 64
    assert all(t.numel() < width * width for t in _tensors(batch).values())


def test_shared_layout_log_probs_equal_the_plain_layout_with_the_mask_built_in_the_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefkit.logprobs import compute_pair_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        plain = compute_pair_logps(model, PairCollator(pad_token_id=0)(FEATS))
        shared = compute_pair_logps(model, PairCollator(pad_token_id=0, share_prompt=True, pad_to_multiple_of=8)(FEATS))
    torch.testing.assert_close(shared.chosen, plain.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.rejected, plain.rejected, rtol=0, atol=1e-5)
