"""The host-performance layer is opt-in: the library changes no process-wide state until it is installed, and
the command line installs it (bf16 probing, padding, packing, malloc, the reference forward's thread)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from prefkit import accel
from prefkit.accel.precision import choose_dtype

ROOT = Path(__file__).resolve().parent.parent

LIBRARY_USE = textwrap.dedent("""
    import ctypes, importlib, pkgutil, sys

    mallopt = []

    class Spy(ctypes.CDLL):  # every mallopt goes through a fresh CDLL's attribute lookup
        def __getattr__(self, name):
            if name == "mallopt":
                mallopt.append(name)
            return super().__getattr__(name)

    ctypes.CDLL = Spy
    threads = __import__("torch").get_num_threads()

    import prefkit
    from prefkit import PrefConfig, PrefTrainer
    from datasets import Dataset
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface
    from tests.conftest import _small, make_tokenizer

    def untouched(where):
        assert "prefkit_segments" not in AttentionInterface(), where
        assert "prefkit_segments" not in AttentionMaskInterface(), where
        assert mallopt == [], where
        assert __import__("torch").get_num_threads() == threads, where

    tok = make_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(**_small(len(tok))))
    rows = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran home"}] * 4
    args = PrefConfig(output_dir=sys.argv[1], use_cpu=True, report_to="none", max_steps=1,
                      per_device_train_batch_size=2, max_length=32, save_strategy="no")
    assert args.pack_pairs is None and args.pad_to_multiple_of is None  # decided from the model
    trainer = PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.ref_model is not None  # full fine-tuning: the path the host layer would run on a thread
    assert not trainer.layout.pack_pairs  # packed pairs need the host layer's attention: not installed
    trainer.train()
    untouched("PrefConfig + PrefTrainer + train()")
    assert not [m for m in sys.modules if m.startswith("prefkit.accel")], "the core imported prefkit.accel"

    # importing any module, the host layer included, has no side effect either: installing does
    for m in pkgutil.walk_packages(prefkit.__path__, "prefkit."):
        if m.name != "prefkit.__main__":  # running it would parse sys.argv
            importlib.import_module(m.name)
    untouched("importing every module")
    print("OK")
""")


@pytest.mark.slow
def test_library_use_changes_no_process_wide_state(tmp_path):
    """import prefkit, PrefConfig, PrefTrainer (a full fine-tuning step included): no transformers attention or
    mask registry entry, no mallopt call, intra-op threads untouched, prefkit.accel never imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFKIT_CPU_BF16": "1"}  # even on a bf16 CPU
    proc = subprocess.run([sys.executable, "-c", LIBRARY_USE, str(tmp_path / "o")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_the_command_line_installs_the_host_layer(tmp_path, model_dir, monkeypatch):
    from transformers import AttentionInterface

    import prefkit.run
    from prefkit.cli import main
    from tests.test_train_e2e import write_pairs

    plans, layouts = [], []
    real, real_resolve = accel.install, prefkit.run.resolve_layout
    monkeypatch.setattr(accel, "install", lambda cfg: plans.append(real(cfg)) or plans[-1])
    monkeypatch.setattr(prefkit.run, "resolve_layout", lambda *a: layouts.append(real_resolve(*a)) or layouts[-1])
    data = write_pairs(tmp_path / "p.jsonl", 8)
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                 str(tmp_path / "o"), "--max_steps", "1", "--per_device_train_batch_size", "4",
                 "--max_length", "64", "--save_strategy", "no"]) == 0
    (plan,), (layout,) = plans, layouts
    # the segment attention registered, packed pairs are the Llama model's layout by default
    assert layout.pack_pairs is True and "prefkit_segments" in AttentionInterface()
    assert plan.run_forwards is accel.run_alongside  # CPU, --overlap_reference true (default)


def test_install_tunes_malloc_and_plans_the_overlap_on_cpu(tmp_path, monkeypatch):
    from prefkit import PrefConfig

    called = []
    monkeypatch.setattr(accel, "tune_cpu_malloc", lambda: called.append(True))
    plan = accel.install(PrefConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert called == [True] and plan.run_forwards is accel.run_alongside
    plan = accel.install(PrefConfig(output_dir=str(tmp_path), use_cpu=True, overlap_reference=False))
    assert plan.run_forwards is None


def test_dtype_choice_cpu_is_fp32_without_bf16_matmul(monkeypatch):
    monkeypatch.setattr("prefkit.accel.precision._cpu_has_bf16_matmul", lambda: False)
    assert choose_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr("prefkit.accel.precision._cpu_has_bf16_matmul", lambda: True)
    assert choose_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert choose_dtype("float16", torch.device("cpu")) == torch.float16
    # trained weights stay fp32 (bf16 AdamW rounds small updates away); --bf16 autocast brings the speed
    assert choose_dtype("auto", torch.device("cpu"), trained=True) == torch.float32
    assert choose_dtype("bfloat16", torch.device("cpu"), trained=True) == torch.bfloat16


@pytest.mark.parametrize("flags, fast", [("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                          ("fpu amx_bf16 amx_tile", True), ("fpu avx512_bf16x", False)])
def test_bf16_matmul_detected_from_cpu_flags(monkeypatch, flags, fast):
    """AMX and AVX512-BF16 CPUs count as fast bf16 (whole flag names only); PREFKIT_CPU_BF16=0 opts out."""
    from prefkit.accel.precision import _cpu_has_bf16_matmul

    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags\t\t: {flags}\n")
    monkeypatch.delenv("PREFKIT_CPU_BF16")
    assert _cpu_has_bf16_matmul() is fast
    monkeypatch.setenv("PREFKIT_CPU_BF16", "0")
    assert _cpu_has_bf16_matmul() is False


def test_command_line_precision_defaults_follow_the_hardware(monkeypatch, tmp_path):
    """On the command line --bf16 defaults to autocast where bf16 matmul is fast, and on such a CPU rows are
    padded to a multiple of 64 (its bf16 kernels are built per shape); explicit values win. A PrefConfig built
    in Python gets none of it."""
    from prefkit.config import PrefConfig
    from prefkit.configfile import parse_config

    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    out = ["--output_dir", str(tmp_path)]
    monkeypatch.setattr("prefkit.accel.precision._cpu_has_bf16_matmul", lambda: False)
    cfg = parse_config(out)
    # the layouts are left to the model-based decision (prefkit.layouts), not filled in from the host
    assert (cfg.bf16, cfg.pad_to_multiple_of, cfg.share_prompt, cfg.pack_pairs) == (False, None, None, None)
    monkeypatch.setattr("prefkit.accel.precision._cpu_has_bf16_matmul", lambda: True)
    cfg = parse_config(out)
    assert (cfg.bf16, cfg.use_cpu, cfg.pad_to_multiple_of) == (True, True, 64)
    assert parse_config(out + ["--bf16", "false"]).pad_to_multiple_of is None
    assert parse_config(out + ["--bf16", "false", "--use_peft", "true"]).pad_to_multiple_of == 64  # bf16 frozen base
    assert parse_config(out + ["--pad_to_multiple_of", "8"]).pad_to_multiple_of == 8
    assert parse_config(out + ["--pack_pairs", "false"]).pack_pairs is False
    plain = PrefConfig(output_dir=str(tmp_path))
    assert (plain.bf16, plain.use_cpu, plain.pad_to_multiple_of, plain.pack_pairs) == (False, False, None, None)


def test_deepspeed_on_cpu_gets_gloo_only_from_the_host_layer(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert accel.host_defaults({})["ddp_backend"] == "gloo"
    assert "ddp_backend" not in accel.host_defaults({"ddp_backend": "ccl"})
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert "ddp_backend" not in accel.host_defaults({})


def test_packed_pairs_without_the_host_layer_are_refused_up_front(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    from datasets import Dataset

    from prefkit import PrefConfig, PrefTrainer
    from prefkit.errors import ConfigError

    monkeypatch.setattr("prefkit.layouts.segment_attention_registered", lambda: False)
    rows = [{"prompt": "the cat", "chosen": " sat", "rejected": " ran"}] * 2
    args = PrefConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", pack_pairs=True)
    with pytest.raises(ConfigError, match=r"prefkit\.accel\.install"):
        PrefTrainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)


def test_cuda_bf16_counts_only_native_support(monkeypatch):
    """A GPU that only emulates bf16 (before Ampere) gets no bf16 default: the probe asks torch without
    emulation."""
    from prefkit.accel.precision import bf16_is_fast

    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an emulating GPU: supported only when emulation counts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert bf16_is_fast("cuda") is False and asked == [False]


def test_tf32_defaults_on_for_cuda_through_training_arguments(monkeypatch, tmp_path):
    """On a CUDA GPU with TF32 the command line turns it on (TrainingArguments' own ``tf32`` field, applied when
    the run's config is built); ``--tf32 false`` turns it off; a CPU, a GPU without TF32 and a PrefConfig
    built in Python leave torch's flags alone."""
    import transformers.training_args as targs

    from prefkit.config import PrefConfig
    from prefkit.configfile import parse_config

    monkeypatch.setattr(accel, "default_device_type", lambda use_cpu=False: "cpu" if use_cpu else "cuda")
    monkeypatch.setattr(accel, "tf32_is_available", lambda: True)
    assert accel.host_defaults({})["tf32"] is True
    assert "tf32" not in accel.host_defaults({"tf32": False})
    assert "tf32" not in accel.host_defaults({"use_cpu": True})
    monkeypatch.setattr(accel, "tf32_is_available", lambda: False)
    assert "tf32" not in accel.host_defaults({})
    monkeypatch.setattr(accel, "tf32_is_available", lambda: True)

    applied = []
    monkeypatch.setattr(targs, "is_torch_tf32_available", lambda: True)
    monkeypatch.setattr(targs, "enable_tf32", applied.append)
    out = ["--output_dir", str(tmp_path)]
    assert parse_config(out).tf32 is True and applied == [True]
    assert parse_config(out + ["--tf32", "false"]).tf32 is False and applied == [True, False]
    assert PrefConfig(output_dir=str(tmp_path)).tf32 is None and applied == [True, False]
