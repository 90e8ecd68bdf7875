"""Bad inputs and faults, as a user meets them: each case ends with a non-zero exit (or the documented outcome)
and exactly one ``prefkit: error:`` line naming what and where, never a traceback (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from prefkit import cli
from prefkit.cli import main


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clean(code: int, text: str, *match: str) -> str:
    errors = [ln for ln in text.splitlines() if ln.startswith("prefkit: error:")]
    assert code != 0, text
    assert len(errors) == 1, text
    assert "Traceback" not in text, text
    for m in match:
        assert m in errors[0], errors[0]
    return errors[0]


# ---- the error boundary: whatever a command raises ends as one line ---------------------------------------

def _raiser(exc: BaseException):
    def command(argv):
        raise exc
    return command


@pytest.mark.parametrize("exc, match", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"), "/out/model.safetensors: no space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "/ro/x: read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (EOFError("Compressed file ended before the end-of-stream marker was reached"), "ends early"),
    (json.JSONDecodeError("Expecting value", "x", 0), "malformed JSON"),
    (MemoryError(), "out of memory"),
    (RuntimeError("expected scalar type Half but found Float"), "dtype mismatch"),
    (ZeroDivisionError("division by zero"), "PREFKIT_DEBUG=1"),
    (KeyError("oops"), "unexpected KeyError"),
])
def test_boundary_turns_library_exceptions_into_one_line(monkeypatch, capsys, exc, match):
    monkeypatch.delenv("PREFKIT_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "train", (_raiser(exc), ""))
    assert_clean(*run(["train"], capsys), match)


def test_prefkit_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "train", (_raiser(ZeroDivisionError("x")), ""))
    monkeypatch.setenv("PREFKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["train"])


# ---- option ranges, checked before anything loads ---------------------------------------------------------

@pytest.fixture
def pairs_file(tmp_path):
    from tests.test_train_e2e import write_pairs

    return write_pairs(tmp_path / "pairs.jsonl", 12)


def _train(tmp_path, data, model, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir",
            str(Path(tmp_path) / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64",
            "--logging_steps", "1", "--report_to", "none", *extra]


@pytest.mark.parametrize("option, value, match", [
    ("per_device_train_batch_size", "0", "--per_device_train_batch_size: must be at least 1, got 0"),
    ("per_device_eval_batch_size", "0", "--per_device_eval_batch_size: must be at least 1"),
    ("gradient_accumulation_steps", "0", "--gradient_accumulation_steps: must be at least 1"),
    ("learning_rate", "-1", "--learning_rate: must be at least 0"),
    ("lora_dropout", "2", "--lora_dropout: must be in [0, 1)"),
    ("lora_dropout", "-0.1", "--lora_dropout: must be in [0, 1)"),
    ("lora_r", "0", "--lora_r: must be positive"),
    ("max_prompt_length", "0", "--max_prompt_length: must be at least 1"),
    ("max_prompt_length", "-5", "--max_prompt_length: must be at least 1"),
    ("max_train_samples", "0", "--max_train_samples: must be at least 1"),
    ("max_eval_samples", "0", "--max_eval_samples: must be at least 1"),
    ("max_length", "1", "--max_length: must be at least 2"),
    ("warmup_steps", "-3", "warmup_steps >= 0"),  # TrainingArguments' own check, on one line
    ("weight_decay", "-0.1", "--weight_decay: must be at least 0"),
    ("max_grad_norm", "-1", "--max_grad_norm: must be at least 0"),
    ("dynamics_probe_size", "0", "--dynamics_probe_size: must be at least 1"),
    ("ref_model_mixup_alpha", "1.5", "--ref_model_mixup_alpha: must be in [0, 1]"),
    ("max_steps", "0", "--max_steps: gives no training steps"),
    ("learning_rate", "inf", "--learning_rate: must be a finite number"),
    ("eval_split_size", "1.5", "--eval_split_size: a share below 1 or a whole count of pairs, got 1.5"),
    ("eval_split_size", "-0.1", "--eval_split_size: must be >= 0"),
    ("beta", "0", "--beta: must be positive, got 0.0"),
    ("label_smoothing", "0.7", "--label_smoothing: must be in [0, 0.5)"),
    ("loss_type", "nosuch", "--loss_type: unknown value 'nosuch'"),
    ("max_steps", "abc", "--max_steps/--max-steps: invalid int value: 'abc'"),
])
def test_numeric_option_out_of_range_is_refused_before_loading(tmp_path, capsys, pairs_file, option, value, match):
    # the model path does not exist: the option must be refused before anything loads
    argv = _train(tmp_path, pairs_file, tmp_path / "no-model", f"--{option}", value)
    assert_clean(*run(argv, capsys), match)


def test_eval_split_leaving_no_training_pair_is_refused(tmp_path, capsys, pairs_file, model_dir):
    argv = _train(tmp_path, pairs_file, model_dir, "--eval_split_size", "50")
    assert_clean(*run(argv, capsys), "--eval_split_size: 50 holds out 50 of the 12 training pairs")


@pytest.mark.parametrize("option, value, match", [
    ("per_device_eval_batch_size", "0", "--per_device_eval_batch_size: must be at least 1"),
    ("max_length", "1", "--max_length: must be at least 2"),
    ("beta", "-1", "--beta: must be positive"),
    ("max_eval_samples", "-1", "--max_eval_samples: must be at least 1"),
])
def test_eval_option_out_of_range_is_refused_before_loading(tmp_path, capsys, pairs_file, option, value, match):
    argv = ["eval", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(pairs_file),
            f"--{option}", value]
    assert_clean(*run(argv, capsys), match)


@pytest.mark.parametrize("option, value, match", [
    ("num_samples", "0", "--num_samples: must be at least 1"),
    ("max_new_tokens", "0", "--max_new_tokens: must be at least 1"),
    ("temperature", "-1", "--temperature: must be >= 0"),
    ("scorer", "nosuch", "--scorer: unknown spec 'nosuch'"),
    ("scorer", "regex:(", "--scorer regex:(: not a valid regular expression"),
    ("scorer", "python:no_such_scorer_mod:f", "cannot import module 'no_such_scorer_mod'"),
])
def test_pairs_option_refused_before_sampling(tmp_path, capsys, model_dir, option, value, match):
    p = _lines_file(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "1 + 1 =", "answer": "2"})])
    argv = ["pairs", "--model_name_or_path", str(model_dir), "--prompts", str(p), "--scorer", "math",
            "--output", str(tmp_path / "o.jsonl"), f"--{option}", value]
    assert_clean(*run(argv, capsys), match)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("argv, match", [
    (["train", "--config", "no-such.yaml"], "--config: no-such.yaml does not exist"),
    (["train", "--resume_from_checkpoint", "no-such-dir"], "--resume_from_checkpoint: no-such-dir is not a directory"),
    (["plot", "no-such-dir"], "no-such-dir: no metrics.jsonl"),
])
def test_missing_named_file_or_folder(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    assert_clean(*run(argv, capsys), match)


def test_loss_weights_must_be_non_negative(tmp_path, capsys, pairs_file):
    argv = _train(tmp_path, pairs_file, tmp_path / "no-model", "--loss_type", "sigmoid", "hinge",
                  "--loss_weights", "1", "-1")
    assert_clean(*run(argv, capsys), "--loss_weights: must be finite, non-negative")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is fine on a CUDA GPU")
def test_fp16_on_a_cpu_is_refused_before_work(tmp_path, capsys, pairs_file):
    argv = _train(tmp_path, pairs_file, tmp_path / "no-model", "--fp16", "true")
    assert_clean(*run(argv, capsys), "--fp16: fp16 mixed precision needs a CUDA GPU")


def test_lora_target_modules_naming_no_module(tmp_path, capsys, pairs_file, model_dir):
    argv = _train(tmp_path, pairs_file, model_dir, "--use_peft", "true", "--lora_target_modules", "no_such_proj")
    line = assert_clean(*run(argv, capsys), "--lora_target_modules: no_such_proj names no module")
    assert "q_proj" in line


def test_output_dir_under_a_file(tmp_path, capsys, pairs_file):
    (tmp_path / "afile").write_text("x")
    argv = _train(tmp_path, pairs_file, tmp_path / "no-model") + ["--output_dir", str(tmp_path / "afile" / "out")]
    assert_clean(*run(argv, capsys), "--output_dir:", "which is a file")


def test_output_dir_is_a_file(tmp_path, capsys, pairs_file):
    (tmp_path / "afile").write_text("x")
    argv = _train(tmp_path, pairs_file, tmp_path / "no-model") + ["--output_dir", str(tmp_path / "afile")]
    assert_clean(*run(argv, capsys), "--output_dir:", "is a file")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes anywhere")
def test_output_dir_not_writable(tmp_path, capsys, pairs_file):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        argv = _train(tmp_path, pairs_file, tmp_path / "no-model") + ["--output_dir", str(ro / "out")]
        assert_clean(*run(argv, capsys), "--output_dir: cannot write")
    finally:
        ro.chmod(0o700)


def test_output_dir_unwritable_is_refused(tmp_path, capsys, pairs_file, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    argv = _train(tmp_path, pairs_file, tmp_path / "no-model")
    assert_clean(*run(argv, capsys), "--output_dir: cannot write", "Permission denied")


def test_eval_output_file_in_a_missing_folder_is_refused_before_the_eval(tmp_path, capsys, pairs_file, model_dir):
    argv = ["eval", "--model_name_or_path", str(model_dir), "--dataset_name", str(pairs_file),
            "--output_file", str(tmp_path / "no" / "such" / "r.json"), "--max_length", "64"]
    assert_clean(*run(argv, capsys), "--output_file: the folder", "does not exist")


# ---- data files ---------------------------------------------------------------------------------------------

GOOD = {"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran home"}


def _lines_file(path, lines: list[str]):
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def _data_case(tmp_path, name: str):
    """(file, expected words of the error line) for one kind of bad data file."""
    import gzip

    good = json.dumps(GOOD)
    p = tmp_path / name
    if name == "deep.jsonl":
        return _lines_file(p, [good, "[" * 100_000 + "]" * 100_000]), [f"{p}:2", "nested too deeply"]
    if name == "deep.json":
        p.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
        return p, [str(p), "nested too deeply"]
    if name == "truncated.jsonl.gz":
        p.write_bytes(gzip.compress(("\n".join([good] * 200) + "\n").encode())[:-30])
        return p, [str(p), "not a valid or complete gzip file"]
    if name == "notgzip.jsonl.gz":
        p.write_text(good + "\n")
        return p, [str(p), "gzip"]
    if name == "badutf8.jsonl":
        p.write_bytes(good.encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
        return p, [f"{p}:2", "invalid UTF-8"]
    if name == "malformed.jsonl":
        return _lines_file(p, [good, "{oops"]), [f"{p}:2", "malformed JSON"]
    if name == "notobject.jsonl":
        return _lines_file(p, [good, "[1, 2]"]), [f"{p}:2", "expected a JSON object, got list"]
    if name == "empty.jsonl":
        p.write_text("")
        return p, [str(p)]
    if name == "missing_field.jsonl":
        return _lines_file(p, [json.dumps({"prompt": "a", "chosen": "b", "rejectd": "c"})]), ["'rejected'", "rejectd"]
    if name == "wrong_type.jsonl":
        return _lines_file(p, [json.dumps({**GOOD, "chosen": 5})]), ["row 1", "'chosen'", "expected a string"]
    if name == "unsupported.txt":
        p.write_text("x")
        return p, [str(p), "unsupported file type"]
    raise AssertionError(name)


DATA_CASES = ["deep.jsonl", "deep.json", "truncated.jsonl.gz", "notgzip.jsonl.gz", "badutf8.jsonl",
              "malformed.jsonl", "notobject.jsonl", "empty.jsonl", "missing_field.jsonl", "wrong_type.jsonl",
              "unsupported.txt"]


@pytest.mark.parametrize("name", DATA_CASES)
def test_bad_data_file(tmp_path, capsys, model_dir, name):
    path, match = _data_case(tmp_path, name)
    assert_clean(*run(_train(tmp_path, path, model_dir), capsys), *match)


def test_missing_data_file(tmp_path, capsys, model_dir):
    assert_clean(*run(_train(tmp_path, tmp_path / "nope.jsonl", model_dir), capsys), "nope.jsonl", "does not exist")


def test_line_over_the_cap(tmp_path, capsys, model_dir, monkeypatch):
    from prefkit.data import load

    monkeypatch.setattr(load, "MAX_LINE_BYTES", 1000)
    p = _lines_file(tmp_path / "long.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "chosen": "the " * 1000})])
    assert_clean(*run(_train(tmp_path, p, model_dir), capsys), f"{p}:2", "line longer than")


def test_gzip_bomb_over_the_decompressed_cap(tmp_path, capsys, model_dir, monkeypatch):
    import gzip

    from prefkit.data import load

    monkeypatch.setattr(load, "MAX_DECOMPRESSED_BYTES", 100_000)
    p = tmp_path / "bomb.jsonl.gz"
    p.write_bytes(gzip.compress(((json.dumps(GOOD) + "\n") * 20_000).encode()))
    assert_clean(*run(_train(tmp_path, p, model_dir), capsys), str(p), "decompresses to more than")


@pytest.mark.parametrize("weight, match", [
    ('"x"', 'weight 1 is "x", not a number'),
    ("NaN", "weight 1 is nan"),
    ("Infinity", "weight 1 is inf"),
    ("-1.0", "weight 1 is -1.0"),
    ("null", "weight 1 is null, not a number"),
])
def test_token_weights_must_be_finite_non_negative_numbers(tmp_path, capsys, model_dir, weight, match):
    # "ran home" + EOS: 3 tokens under the test tokenizer
    line = json.dumps({**GOOD, "rejected_token_weights": [1.0, 0.0, 1.0]}).replace("0.0", weight)
    p = _lines_file(tmp_path / "w.jsonl", [line])
    argv = _train(tmp_path, p, model_dir, "--use_token_weights", "true", "--loss_type", "sigmoid")
    assert_clean(*run(argv, capsys), "row 1", "'rejected_token_weights'", match)


def test_pairs_skips_and_counts_empty_prompts(tmp_path, capsys, model_dir):
    p = _lines_file(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "1 + 1 =", "answer": "2"}),
                                                 json.dumps({"prompt": "  ", "answer": "2"})])
    out = tmp_path / "pairs.jsonl"
    code, text = run(["pairs", "--model_name_or_path", str(model_dir), "--prompts", str(p), "--scorer", "math",
                      "--num_samples", "2", "--max_new_tokens", "3", "--output", str(out)], capsys)
    assert code == 0 and "Traceback" not in text
    assert "empty prompts skipped: 1" in text
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["prompts"] == 1 and summary["empty_prompts_skipped"] == 1


def test_pairs_with_only_empty_prompts_is_refused(tmp_path, capsys, model_dir):
    p = _lines_file(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "", "answer": "2"})])
    argv = ["pairs", "--model_name_or_path", str(model_dir), "--prompts", str(p), "--scorer", "math",
            "--output", str(tmp_path / "o.jsonl")]
    assert_clean(*run(argv, capsys), "every prompt is empty", "'prompt'")


def test_pairs_output_under_a_file_is_refused_before_sampling(tmp_path, capsys, model_dir):
    (tmp_path / "f").write_text("x")
    p = _lines_file(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "1 + 1 =", "answer": "2"})])
    argv = ["pairs", "--model_name_or_path", str(model_dir), "--prompts", str(p), "--scorer", "math",
            "--output", str(tmp_path / "f" / "o.jsonl")]
    assert_clean(*run(argv, capsys), "--output:", "which is a file")


# ---- resume: what is resumed is checked first -----------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (the end), trained once for the module."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _small, make_tokenizer
    from tests.test_train_e2e import write_pairs

    base = tmp_path_factory.mktemp("finished")
    tok = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_small(len(tok)), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(base / "model")
    tok.save_pretrained(base / "model")
    write_pairs(base / "pairs.jsonl", 12)
    cwd = os.getcwd()
    os.chdir(base)  # relative paths, so that a copy of the run is the same run
    try:
        assert main(_resume(Path("."), ckpt="")[:-2]) == 0
    finally:
        os.chdir(cwd)
    return base


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _resume(base, *extra: str, ckpt: str = "latest") -> list[str]:
    """The finished run's command line (relative to its folder, the working directory), resuming from ``ckpt``."""
    return _train(Path("."), "pairs.jsonl", "model", "--max_steps", "4", "--save_steps", "2", "--learning_rate",
                  "1e-3", *extra, "--resume_from_checkpoint", ckpt)


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_of_a_finished_run_is_nothing_to_do(run_copy, capsys):
    out = run_copy / "out"
    before = {p.name: _digest(p) for p in out.rglob("*.safetensors")}
    code, text = run(_resume(run_copy), capsys)
    assert code == 0 and "nothing to do" in text and "Traceback" not in text, text[-3000:]
    assert {p.name: _digest(p) for p in out.rglob("*.safetensors")} == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("extra, option", [
    (["--loss_type", "hinge"], "--loss_type"),
    (["--beta", "0.5"], "--beta"),
    (["--granularity", "token"], "--granularity"),
    (["--learning_rate", "5e-3"], "--learning_rate"),
    (["--max_length", "32"], "--max_length"),
    (["--seed", "7"], "--seed"),
])
def test_resume_refuses_a_changed_objective_or_data_option(run_copy, capsys, extra, option):
    ckpt = "out/checkpoint-2"
    assert_clean(*run(_resume(run_copy, *extra, ckpt=ckpt), capsys), "--resume_from_checkpoint", option, "the run:")


def test_resume_allows_a_harmless_change_and_continues_the_curve(run_copy, capsys):
    out = run_copy / "out"
    full = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    code, text = run(_resume(run_copy, "--logging_steps", "2", "--save_steps", "1",
                             ckpt="out/checkpoint-2"), capsys)
    assert code == 0, text
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["loss"] for r in recs if "loss" in r]
    assert resumed[:2] == full[:2]  # steps past the checkpoint were dropped, not kept twice
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_resume_refuses_changed_data_content(run_copy, capsys):
    from tests.test_train_e2e import write_pairs

    write_pairs(run_copy / "pairs.jsonl", 12, seed=9)  # same path, other pairs
    ckpt = "out/checkpoint-2"
    assert_clean(*run(_resume(run_copy, ckpt=ckpt), capsys), "the training pairs differ")


def _damage(ckpt, how: str) -> None:
    if how == "truncated weights":
        w = ckpt / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    elif how == "no trainer state":
        (ckpt / "trainer_state.json").unlink()
    elif how == "garbage trainer state":
        (ckpt / "trainer_state.json").write_text("{not json")
    elif how == "no weights":
        (ckpt / "model.safetensors").unlink()
    elif how == "garbage header":
        (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    elif how == "truncated optimizer":
        o = ckpt / "optimizer.pt"
        o.write_bytes(o.read_bytes()[:-200])


@pytest.mark.parametrize("how, match", [
    ("truncated weights", "model.safetensors is"),
    ("no trainer state", "trainer_state.json is missing"),
    ("garbage trainer state", "trainer_state.json cannot be read"),
    ("no weights", "holds no model or adapter weights"),
    ("garbage header", "no valid safetensors header"),
    ("truncated optimizer", "optimizer.pt is not a whole torch archive"),
])
def test_resume_refuses_a_damaged_checkpoint(run_copy, capsys, how, match):
    _damage(run_copy / "out" / "checkpoint-4", how)
    assert_clean(*run(_resume(run_copy), capsys), "out/checkpoint-4", match)


def test_resume_refuses_a_checkpoint_past_max_steps(run_copy, capsys):
    argv = _resume(run_copy, "--max_steps", "2")
    assert_clean(*run(argv, capsys), "checkpoint-4", "past --max_steps 2")


def test_resume_without_the_saved_options_is_refused(run_copy, capsys):
    (run_copy / "out" / "prefkit_config.yaml").unlink()
    assert_clean(*run(_resume(run_copy, ckpt="out/checkpoint-2"), capsys),
                 "prefkit_config.yaml is missing")


def test_torn_last_metrics_line_is_dropped_and_said(run_copy, capsys, caplog):
    m = run_copy / "out" / "metrics.jsonl"
    m.write_text(m.read_text() + '{"step": 3, "lo')
    code, text = run(_resume(run_copy, ckpt="out/checkpoint-2"), capsys)
    assert code == 0 and "Traceback" not in text, text
    assert "dropped a torn last line" in caplog.text
    assert [r["step"] for r in map(json.loads, m.read_text().splitlines()) if "loss" in r] == [1, 2, 3, 4]


def test_damaged_metrics_line_in_the_middle_is_named(run_copy, capsys):
    m = run_copy / "out" / "metrics.jsonl"
    lines = m.read_text().splitlines()
    m.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert_clean(*run(_resume(run_copy, ckpt="out/checkpoint-2"), capsys),
                 "out/metrics.jsonl:2", "malformed JSON")


def test_plot_of_a_torn_metrics_file(run_copy, capsys, caplog):
    m = run_copy / "out" / "metrics.jsonl"
    m.write_text(m.read_text() + '{"step": 5, "lo')
    code, text = run(["plot", str(run_copy / "out")], capsys)
    assert code == 0 and "dropped a torn last line" in caplog.text and "Traceback" not in text


def test_second_run_into_a_locked_output_dir_is_refused(run_copy, capsys):
    from prefkit.files import output_dir_lock

    with output_dir_lock(run_copy / "out", ".prefkit.lock"):
        line = assert_clean(*run(_resume(run_copy, ckpt="out/checkpoint-2"), capsys),
                            "--output_dir", "is in use by another prefkit run")
    assert str(__import__("os").getpid()) in line


def test_disk_full_during_a_checkpoint_save(tmp_path, capsys, pairs_file, model_dir, monkeypatch):
    import torch

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)  # checkpoint-1's torch archives (after its weights)
    argv = _train(tmp_path, pairs_file, model_dir, "--save_steps", "1")
    assert_clean(*run(argv, capsys), "out/checkpoint-1/", "no space left on the device")
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert ckpt.is_dir() and not (ckpt / "prefkit_checkpoint_complete").exists()  # the half save is not marked
    monkeypatch.undo()
    assert_clean(*run(argv + ["--resume_from_checkpoint", "latest"], capsys), "no complete checkpoint")


def test_atomic_writes_use_unique_temp_names(tmp_path, monkeypatch):
    from prefkit import files

    temps = []
    replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (temps.append(Path(a).name), replace(a, b)))
    files.atomic_write_text(tmp_path / "x.json", "1")
    files.atomic_write_text(tmp_path / "x.json", "2")
    assert len(set(temps)) == 2 and all(str(os.getpid()) in t for t in temps)  # two writers never share one
    assert (tmp_path / "x.json").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_resume_latest_with_no_complete_checkpoint(tmp_path, capsys, pairs_file, model_dir):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)  # a save killed before its marker
    argv = _train(tmp_path, pairs_file, model_dir, "--resume_from_checkpoint", "latest")
    assert_clean(*run(argv, capsys), "no complete checkpoint")


# ---- security: inputs cannot reach further than asked ---------------------------------------------------------

@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "PATH", "LD_LIBRARY_PATH", "PYTHONSTARTUP"])
def test_config_env_outside_the_allowlist_is_refused(tmp_path, capsys, monkeypatch, name):
    before = os.environ.get(name)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"env:\n  WANDB_PROJECT: p\n  {name}: /tmp/evil\nbeta: 0.1\n")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert_clean(*run(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "o")], capsys),
                 f"env: {name} is not a variable a config file may set")
    assert os.environ.get(name) == before and "WANDB_PROJECT" not in os.environ  # nothing was set


def test_config_env_in_the_allowlist_is_set(tmp_path, monkeypatch):
    from prefkit.configfile import given_options

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("env:\n  WANDB_PROJECT: prefkit-test\nbeta: 0.2\n")
    assert "beta" in given_options(["--config", str(cfg)])
    assert os.environ["WANDB_PROJECT"] == "prefkit-test"


def test_python_scorer_leaves_sys_path_alone(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from prefkit.pairs.scorers import build_scorer

    (tmp_path / "my_score_mod.py").write_text("import helper_mod\ndef f(p, c, row):\n    return helper_mod.X\n")
    (tmp_path / "helper_mod.py").write_text("X = 2.0\n")
    (tmp_path / "shadow_lib_mod.py").write_text("")  # a same-named file must not stand in for a library later
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        scorer = build_scorer("python:my_score_mod:f")
        assert scorer.fn(None, "x", {}) == 2.0  # a helper beside it is found while it loads
        assert sys.path == path_before
        assert importlib.util.find_spec("shadow_lib_mod") is None
        assert "my_score_mod" not in sys.modules
    finally:
        sys.modules.pop("helper_mod", None)


def _ref_ds(tmp_path, tokenizer):
    from datasets import Dataset

    from prefkit.config import PrefConfig
    from prefkit.data import prepare_dataset
    from tests.test_train_e2e import write_pairs

    cfg = PrefConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", max_length=64,
                     ref_cache_dir=str(tmp_path / "cache"), bf16=False)
    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 4).read_text().splitlines()]
    return prepare_dataset(Dataset.from_list(rows), tokenizer, cfg, source="p")[0], cfg


def test_reference_cache_is_keyed_by_the_weights_content(tmp_path, tiny_llama, tiny_tokenizer):
    import copy

    import torch

    from prefkit.refcache import cache_key

    ds, _ = _ref_ds(tmp_path, tiny_tokenizer)
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)  # same path, same file names and sizes: other weights
    assert cache_key(ds, "m", False, reference=tiny_llama) != cache_key(ds, "m", False, reference=other)
    assert cache_key(ds, "m", False, reference=tiny_llama) == cache_key(ds, "m", False,
                                                                        reference=copy.deepcopy(tiny_llama))


@pytest.mark.parametrize("tamper", ["short row", "nan", "positive", "fewer rows"])
def test_tampered_reference_cache_is_recomputed(tmp_path, tiny_llama, tiny_tokenizer, caplog, tamper):
    import shutil

    from datasets import Dataset, load_from_disk

    from prefkit.refcache import attach_reference_logps

    ds, cfg = _ref_ds(tmp_path, tiny_tokenizer)
    fresh = attach_reference_logps(ds, tiny_llama, tiny_tokenizer, cfg, model_path="m")
    (entry,) = (tmp_path / "cache").iterdir()
    cached = load_from_disk(str(entry)).to_dict()
    rows = cached["ref_chosen_logps"]
    if tamper == "short row":
        rows[0] = rows[0][:-1]
    elif tamper == "nan":
        rows[1][0] = float("nan")
    elif tamper == "positive":
        rows[1][0] = 5.0
    else:
        cached = {k: v[:-1] for k, v in cached.items()}
    shutil.rmtree(entry)
    Dataset.from_dict(cached).save_to_disk(str(entry))
    again = attach_reference_logps(ds, tiny_llama, tiny_tokenizer, cfg, model_path="m")
    assert again["ref_chosen_logps"] == fresh["ref_chosen_logps"]
    assert "computing them again" in caplog.text
    assert load_from_disk(str(entry))["ref_chosen_logps"] == fresh["ref_chosen_logps"]  # the entry is repaired


def test_reward_model_scorer_refuses_pickled_weights(tmp_path, tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from prefkit.pairs.scorers import build_scorer
    from tests.conftest import _small

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(**_small(len(tiny_tokenizer)), num_labels=1))
    rm.config.save_pretrained(tmp_path / "rm")  # transformers saves safetensors only: write the pickle by hand
    torch.save(rm.state_dict(), tmp_path / "rm" / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    assert not list((tmp_path / "rm").glob("*.safetensors"))
    from prefkit.errors import ModelError

    with pytest.raises(ModelError, match="only pickled weights"):
        build_scorer(f"reward_model:{tmp_path / 'rm'}")
    assert build_scorer(f"reward_model:{tmp_path / 'rm'}", allow_pickle=True).model is not None


def test_eval_refuses_a_pickled_adapter(tmp_path, capsys, model_dir, pairs_file):
    from transformers import LlamaForCausalLM

    from prefkit.models import apply_lora

    peft = apply_lora(LlamaForCausalLM.from_pretrained(model_dir), r=2, alpha=4, dropout=0.0,
                      target_modules=["q_proj"])
    peft.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    (tmp_path / "tok").mkdir()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    argv = ["eval", "--model_name_or_path", str(tmp_path / "adapter"), "--dataset_name", str(pairs_file),
            "--max_length", "64", "--output_file", str(tmp_path / "e.json")]
    assert_clean(*run(argv, capsys), "no adapter_model.safetensors", "--allow_pickle")


def test_torch_floor_has_the_torch_load_fix():
    import re

    import tomllib

    deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    major, minor = map(int, re.search(r">=\s*(\d+)\.(\d+)", spec).groups())
    assert (major, minor) >= (2, 6)
