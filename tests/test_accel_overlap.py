"""The reference forward alongside the policy forward: same results as one after the other, threads restored."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from prefkit.accel.overlap import run_alongside


def test_run_alongside_splits_threads_and_restores_them():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        seen = {}

        def front():
            seen["front"] = (threading.current_thread().name, torch.get_num_threads())
            return "f"

        def back():
            seen["back"] = (threading.current_thread().name, torch.get_num_threads())
            return "b"

        assert run_alongside(front, back) == ("f", "b")
        assert seen["front"] == (threading.current_thread().name, 2)
        assert seen["back"][0].startswith("prefkit-reference") and seen["back"][1] == 2
        assert torch.get_num_threads() == 4
        torch.set_num_threads(1)  # nothing to split: one after the other, here
        seen.clear()
        assert run_alongside(front, back) == ("f", "b")
        assert seen["front"] == seen["back"] == (threading.current_thread().name, 1)
    finally:
        torch.set_num_threads(before)


def test_run_alongside_raises_the_background_error_and_restores_threads():
    before = torch.get_num_threads()

    def back():
        raise ValueError("reference failed")

    with pytest.raises(ValueError, match="reference failed"):
        run_alongside(lambda: 1, back)
    assert torch.get_num_threads() == before


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_overlap_gives_the_same_losses(tmp_path: Path, tiny_tokenizer, monkeypatch, bf16):
    """Full fine-tuning on CPU: the reference forward runs on the worker thread (under the same autocast) and the
    loss curve is the one of the sequential run."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefkit.trainer
    from prefkit import PrefConfig, PrefTrainer
    from prefkit.accel import install
    from tests.conftest import _small
    from tests.test_train_e2e import write_pairs

    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 16).read_text().splitlines()]
    real, threads = prefkit.trainer.compute_pair_logps, []

    def recording(model, batch, **kw):
        threads.append((threading.current_thread().name, torch.is_grad_enabled(),
                        torch.is_autocast_enabled("cpu")))
        return real(model, batch, **kw)

    monkeypatch.setattr(prefkit.trainer, "compute_pair_logps", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    losses = {}
    try:
        for overlap in (True, False):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**_small(len(tiny_tokenizer))))
            args = PrefConfig(output_dir=str(tmp_path / str(overlap)), per_device_train_batch_size=4, use_cpu=True,
                              report_to="none", max_steps=3, logging_steps=1, learning_rate=1e-2, max_length=64,
                              bf16=bf16, overlap_reference=overlap, seed=0, pack_pairs=True)
            plan = install(args)  # as the command line does
            trainer = PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tiny_tokenizer, run_forwards=plan.run_forwards)
            threads.clear()
            trainer.train()
            losses[overlap] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
            if overlap:
                main = threading.current_thread().name
                # the two forwards of a step start in either order
                policy, ref = sorted(threads[:2], key=lambda t: t[0].startswith("prefkit-reference"))
                assert policy == (main, True, bf16)  # policy: here, with graph
                assert ref[0].startswith("prefkit-reference") and ref[1:] == (False, bf16)
            else:
                assert {t[0] for t in threads} == {threading.current_thread().name}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-6, atol=1e-7)
