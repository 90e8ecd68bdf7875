"""The fused response-only LM head under DDP, FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo): each rank's
log-probs and the synchronised gradients equal one process's fused path on the same pairs, and no operator
allocates a (tokens x vocab) tensor, which the full-logits path does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefkit.accel.attention import register_segment_attention
from prefkit.logprobs import compute_pair_logps
from tests.fused_head_worker import LAYOUTS, LargestLogits, pair_loss, rank_batch
from tests.test_distributed import CONFIG, _free_port

VOCAB = 512  # far above the hidden size, so a (rows x vocab) tensor is not mistaken for a weight


@pytest.fixture(scope="module")
def head_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    path = tmp_path_factory.mktemp("head") / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _one_process(model_dir: Path) -> dict:
    """Per layout: each rank's log-probs, and the gradient of the mean of the ranks' losses, on one process."""
    register_segment_attention()
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").train()
    out = {}
    for layout in LAYOUTS:
        model.zero_grad(set_to_none=True)
        per_rank = []
        for rank in (0, 1):
            batch = rank_batch(layout, rank)
            with LargestLogits(VOCAB) as seen:
                lp = compute_pair_logps(model, batch)
                (pair_loss(lp) / 2).backward()
            n_resp = int(batch.response_len.sum())
            assert 0 < seen.rows <= n_resp  # one process: the fused head alone never computes more rows
            per_rank.append({"chosen": lp.chosen.detach(), "rejected": lp.rejected.detach(), "responses": n_resp,
                             "positions": batch.input_ids.numel()})
        out[layout] = (per_rank, {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def _launch_worker(config: Path, model_dir: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), "-m", "tests.fused_head_worker", str(model_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
# no FSDP2 config here: on a CPU accelerate runs it as DDP; the fused head under real FSDP2 units (torchrun,
# fully_shard) is test_fsdp2_shards_the_reference_like_the_policy's reference forward
@pytest.mark.parametrize("engine", ["ddp_cpu_gloo", "zero2_cpu_gloo", "zero3_cpu_gloo"])
def test_fused_head_under_a_multi_process_engine(tmp_path, head_model_dir, engine):
    _launch_worker(CONFIG.parent / f"{engine}.yaml", head_model_dir, tmp_path)
    want = _one_process(head_model_dir)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["world_size"] == 2
        for layout, (per_rank, grads) in want.items():
            mine = per_rank[rank]
            for path in ("fused", "full"):
                res = got[layout, path]
                for side in ("chosen", "rejected"):
                    torch.testing.assert_close(res[side], mine[side], rtol=1e-5, atol=1e-6,
                                               msg=f"{engine} {layout} {path} {side}")
                assert res["grads"].keys() == grads.keys()
                for name, g in grads.items():
                    torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6,
                                               msg=f"{engine} {layout} {path} {name}")
            # the fused head never allocates more rows of logits than there are response tokens; full logits
            # cover every position of the batch
            assert 0 < got[layout, "fused"]["logit_rows"] <= mine["responses"], (engine, layout)
            assert got[layout, "full"]["logit_rows"] >= mine["positions"], (engine, layout)


def _tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied)).train()


@pytest.mark.parametrize("variant", ["untied", "tied", "lora", "lora-on-head"])
def test_patched_head_through_the_models_forward_equals_the_backbone_and_head_path(monkeypatch, variant):
    """What a multi-process engine runs (the root forward, the head patched) gives the single-process fused
    path's log-probs, log Σ p², gradients and allocations, the head's own hooks still run, and its forward is
    restored after."""
    import prefkit.logprobs as lp_mod

    model = _tiny(tied=variant == "tied")
    if variant.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] + (["lm_head"] if variant == "lora-on-head" else [])
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False))
    register_segment_attention()
    head = lp_mod.unwrap_model(model).get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    runs = {}
    for through_forward in (False, True):
        monkeypatch.setattr(lp_mod, "_is_distributed_wrapper", lambda m, t=through_forward: t)
        model.zero_grad(set_to_none=True)
        batch = rank_batch("packed", 0)
        with LargestLogits(VOCAB) as seen:
            lp = compute_pair_logps(model, batch, want_sq=True)
            pair_loss(lp).backward()
        runs[through_forward] = (lp, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                                 seen.rows)
        assert "forward" not in head.__dict__
    (a, ga, rows_a), (b, gb, rows_b) = runs[False], runs[True]
    n_resp = int(rank_batch("packed", 0).response_len.sum())
    assert calls[-1] == (n_resp,)  # the hook saw the patched head's output: one log-prob per response token
    assert rows_a == rows_b and 0 < rows_b <= n_resp
    for field in ("chosen", "rejected", "chosen_sq", "rejected_sq"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0, msg=field)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=0, msg=name)


def test_patched_head_is_restored_when_the_forward_fails():
    from prefkit.logprobs import response_head

    head = torch.nn.Linear(4, 8)
    own = head.forward
    with pytest.raises(RuntimeError), response_head(head, torch.tensor([0]), torch.tensor([0]), torch.tensor([1])):
        head(torch.zeros(1, 1, 4))
        raise RuntimeError("the model's forward failed")
    assert "forward" not in head.__dict__ and head.forward == own



@pytest.mark.slow
def test_fsdp2_shards_the_reference_like_the_policy(head_model_dir, tmp_path):
    """FSDP2 on 2 gloo processes (tests/fsdp_reference_worker.py): the frozen reference is sharded with accelerate's
    FSDP2 preparation (one unit per decoder layer, as the policy), its parameters are DTensors and each rank holds
    half of them; each rank's reference log-probs, in every layout, equal one process's unsharded reference."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "tests.fsdp_reference_worker", str(head_model_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    register_segment_attention()
    one = LlamaForCausalLM.from_pretrained(head_model_dir, attn_implementation="sdpa").eval()
    total = sum(p.numel() for p in one.parameters())
    for got in ranks:
        assert got["dtensor"] and got["total"] == total and got["local"] == total // 2
        assert got["units"] == one.config.num_hidden_layers + 4  # the layers, embedding, norm, head, root
    for rank, got in enumerate(ranks):
        for layout in LAYOUTS:
            with torch.no_grad():
                want = compute_pair_logps(one, rank_batch(layout, rank))
            for side in ("chosen", "rejected"):
                assert torch.allclose(got[layout][side], getattr(want, side), atol=1e-5, rtol=0), (rank, layout, side)


def test_trainer_shards_its_reference_under_fsdp2_and_runs_it_on_the_main_thread(monkeypatch, tiny_llama,
                                                                                  tiny_tokenizer, tmp_path):
    """accelerate enables FSDP only on GPUs, so on the CPU the trainer's side is checked with the FSDP2 test
    above's sharding replaced: under FSDP2 PrefTrainer hands its reference copy to fsdp2_reference, keeps what
    that returns, and never runs it on the overlap thread (its collectives must run in one order on every rank)."""
    from datasets import Dataset

    import prefkit.trainer
    from prefkit import PrefConfig, PrefTrainer, accel

    sharded = []
    monkeypatch.setattr(prefkit.trainer, "is_fsdp2", lambda accelerator: True)
    monkeypatch.setattr(prefkit.trainer, "fsdp2_reference", lambda ref, accelerator: sharded.append(ref) or ref)
    opts = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                use_cpu=True, save_strategy="no")
    args = PrefConfig(**{**opts, **accel.host_defaults(opts)})
    rows = [{"prompt": "the cat", "chosen": " sat", "rejected": " ran home"}] * 2
    trainer = PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer, run_forwards=accel.install(args).run_forwards)
    assert sharded == [trainer.ref_model] and trainer.ref_model is not tiny_llama
    assert trainer.run_forwards is not None
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert not trainer._reference_alongside(batch)
    monkeypatch.setattr(prefkit.trainer, "is_fsdp2", lambda accelerator: False)
    assert trainer._reference_alongside(batch)
