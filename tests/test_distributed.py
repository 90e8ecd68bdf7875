"""Two CPU processes (gloo, accelerate launch: DDP, FSDP2, DeepSpeed ZeRO-2/3) give the loss curve of one process
with twice the gradient accumulation, for DPO, ADPO adaptive + POET and DPO+RC; and a 2-process run resumes from its
checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_e2e import assert_each_step_once, killed_at, write_pairs

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp_cpu_gloo.yaml"


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _alphas(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["rc/alpha"] for r in recs if "rc/alpha" in r}


def _assert_same_curve(two: Path, one: Path, *, alphas: bool) -> None:
    """Same loss at every step (and the same RC alpha) for the multi-process run and the single one."""
    l2, l1 = _losses(two), _losses(one)
    assert sorted(l2) == sorted(l1) == [1, 2, 3, 4]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4, abs=1e-5), step
    if alphas:
        a2, a1 = _alphas(two), _alphas(one)
        assert a2 and all(a2[s] == pytest.approx(a1[s], rel=1e-4) for s in a1)


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "4", "--logging_steps", "1", "--save_steps", "2", "--learning_rate", "5e-3",
            "--max_length", "64", "--seed", "3", "--use_cpu", "true", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], config: Path = CONFIG) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    # a port of its own: launches from parallel test workers must not meet at accelerate's default port
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), "-m", "prefkit", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _single(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "prefkit", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [  # plain DPO's path is inside each of the others: make test-long runs it
    pytest.param([], marks=pytest.mark.long, id="dpo"),
    pytest.param(["--granularity", "adaptive", "--num_segments", "3", "--poet", "true"], id="adpo+poet"),
    # DPO+RC on DDP is also the FSDP2 config's run on a CPU (accelerate runs it as DDP): make test-long runs it here
    pytest.param(["--reward_calibration", "true"], marks=pytest.mark.long, id="dpo+rc"),
    pytest.param(["--precompute_ref_log_probs", "true"], id="dpo+precomputed-ref")])
def test_two_processes_match_one_with_double_accumulation(tmp_path, model_dir, objective):
    if "--precompute_ref_log_probs" in objective:  # separate caches: each run computes its own
        objective = [*objective, "--ref_cache_dir", str(tmp_path / "cache")]
    data = write_pairs(tmp_path / "p.jsonl", 24)
    two, one = tmp_path / "two", tmp_path / "one"
    log = _launch(_args(model_dir, data, two, "--per_device_train_batch_size", "2", *objective))
    if "--precompute_ref_log_probs" in objective:
        assert "rank 0 computes 12 of 24 pairs" in log and "rank 1 computes 12 of 24 pairs" in log
        objective[-1] = str(tmp_path / "cache1")
    _single(_args(model_dir, data, one, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                  *objective))
    _assert_same_curve(two, one, alphas=bool(objective) and objective[0] == "--reward_calibration")


@pytest.mark.slow
def test_an_fsdp2_config_on_cpu_runs_data_parallel_says_so_and_matches_one(tmp_path, model_dir):
    """accelerate enables FSDP only on GPUs: launched on 2 CPU processes, an FSDP2 config runs as plain data
    parallel, which prefkit says in one line (real FSDP2 sharding on CPU: tests/test_distributed_head.py's
    torchrun worker). The loss curve equals one process with twice the accumulation, and the output is a full
    model. Held-out pairs are scored before and after training by each process on its shard (7 pairs in
    batches of 2: the last batch is padded across processes and the padding dropped), with the single
    process's metrics."""
    data = write_pairs(tmp_path / "p.jsonl", 28)
    two, one = tmp_path / "fsdp", tmp_path / "one"
    extra = ["--reward_calibration", "true", "--eval_split_size", "0.25", "--per_device_eval_batch_size", "2"]
    log = _launch(_args(model_dir, data, two, "--per_device_train_batch_size", "2", *extra),
                  CONFIG.parent / "fsdp2_cpu_gloo.yaml")
    assert "accelerate enables only on GPUs: this cpu launch runs as plain data parallel" in log
    _single(_args(model_dir, data, one, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                  *extra))
    _assert_same_curve(two, one, alphas=True)
    held_out = [json.loads((run / "eval_results.json").read_text()) for run in (two, one)]
    assert held_out[1]["after"]["num_pairs"] == 7
    for when in ("before", "after"):
        for key, value in held_out[1][when].items():  # before training there are no implicit rewards (None)
            assert held_out[0][when][key] == (value if value is None else pytest.approx(value, rel=1e-4, abs=1e-5))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two)  # the sharded run's output is a loadable full model


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [  # LoRA under ZeRO-3: make test-long (zero3-full covers the partitioning)
    pytest.param("2", [], id="zero2-full"), pytest.param("3", [], id="zero3-full"),
    pytest.param("3", ["--use_peft", "true", "--lora_dropout", "0"], marks=pytest.mark.long, id="zero3-lora")])
def test_deepspeed_two_processes_match_one(tmp_path, model_dir, stage, extra):
    """DeepSpeed ZeRO-2 and ZeRO-3 (parameters partitioned; the full fine-tuning reference sharded the same way)
    on 2 CPU processes give the loss curve and RC alpha of one process with twice the accumulation; checkpoints
    are DeepSpeed's sharded ones and the final model is saved whole."""
    data = write_pairs(tmp_path / "p.jsonl", 24)
    two, one = tmp_path / "zero", tmp_path / "one"
    extra = [*extra, "--reward_calibration", "true"]
    _launch(_args(model_dir, data, two, "--per_device_train_batch_size", "2", *extra),
            CONFIG.parent / f"zero{stage}_cpu_gloo.yaml")
    _single(_args(model_dir, data, one, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                  *extra))
    _assert_same_curve(two, one, alphas=True)
    assert sorted(p.name for p in (two / "checkpoint-2" / "global_step2").iterdir() if "optim_states" in p.name) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    if "--use_peft" not in extra:
        from safetensors.torch import load_file

        a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in b)


@pytest.mark.slow
def test_deepspeed_zero3_refuses_what_runs_outside_the_engine(model_dir, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", 4)
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "DS_ACCELERATOR": "cpu"}
    for extra, option in ((["--eval_split_size", "2"], "--eval_split_size"),
                          (["--precompute_ref_log_probs", "true"], "--precompute_ref_log_probs")):
        proc = subprocess.run([sys.executable, "-m", "prefkit", *_args(model_dir, data, tmp_path / "o", *extra)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode != 0 and f"prefkit: error: {option}:" in proc.stderr and "ZeRO-3" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_process_resume(tmp_path, model_dir):
    data = write_pairs(tmp_path / "p.jsonl", 24)
    full = tmp_path / "full"
    _launch(_args(model_dir, data, full, "--per_device_train_batch_size", "2"))
    resumed = killed_at(full, tmp_path / "resumed", 2)
    _launch(_args(model_dir, data, resumed, "--per_device_train_batch_size", "2", "--resume_from_checkpoint", "latest"))
    assert_each_step_once(resumed, 4)
    a, b = _losses(full), _losses(resumed)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.parametrize("name", ["ddp", "ddp_cpu_gloo", "fsdp2", "fsdp2_cpu_gloo", "zero2", "zero2_cpu_gloo", "zero3",
                                  "zero3_cpu_gloo", "multinode_ddp"])
def test_accelerate_configs_are_accepted(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(CONFIG.parent / f"{name}.yaml"))
    assert cfg.num_processes >= 2
    if name == "multinode_ddp":
        assert cfg.num_machines == 2 and cfg.main_process_ip and cfg.main_process_port


def test_zero3_reference_is_reloaded_from_the_policy_path(monkeypatch, model_dir, tiny_llama):
    """Under ZeRO-3 a copy of the partitioned policy would be empty: the reference is reloaded from its path,
    and a model without one gets a message saying to pass ref_model=."""
    from transformers import AutoModelForCausalLM

    import prefkit.reference as reference
    from prefkit.errors import ConfigError
    from prefkit.reference import reference_copy

    monkeypatch.setattr(reference, "is_deepspeed_zero3_enabled", lambda: True)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)  # the reloaded reference is the saved model, not this object
    ref = reference_copy(policy)
    assert ref is not policy and torch.equal(ref.lm_head.weight + 1.0, policy.lm_head.weight)
    tiny_llama.name_or_path = ""
    with pytest.raises(ConfigError, match="pass ref_model= explicitly"):
        reference_copy(tiny_llama)


@pytest.mark.slow
def test_nan_skip_on_one_rank_is_agreed_by_both(tmp_path, model_dir):
    """--nan_policy skip with a NaN loss on rank 1 only: both ranks skip that batch (a finite flag is
    all-reduced) and take the same zero-gradient step, so the run finishes, every rank says it skipped, and no
    NaN statistic is logged."""
    data = write_pairs(tmp_path / "p.jsonl", 24)
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "-m", "tests.poison_rank",
           "1", "2", *_args(model_dir, data, out, "--per_device_train_batch_size", "2", "--nan_policy", "skip",
                            "--eval_split_size", "0")]
    # ranks that disagree hang in a collective: kill the whole process group, not only the launcher
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the ranks hung (they disagreed about skipping the batch)")
    assert proc.returncode == 0, stderr[-4000:]
    assert "non-finite loss at step 1" in stderr and "non-finite loss on another process at step 1" in stderr
    assert stderr.count("skipping this batch") == 2, stderr[-4000:]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    values = [v for r in recs for v in r.values() if isinstance(v, float)]
    assert values and all(v == v and abs(v) != float("inf") for v in values)
    skipped = next(r for r in recs if r["step"] == 2 and "loss" in r)
    assert "rewards/margins" not in skipped  # the only batch of step 2 was skipped: no statistic to log
