"""CLI behaviour: YAML + overrides, unknown options, one-line errors with non-zero exit, plots,
critical tokens, cached reference log-probs, NaN handling, atomic checkpoints, a seeded golden run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefkit.cli import main, parse_config
from tests.conftest import poison_loss
from tests.test_train_e2e import _losses, _train_args, write_pairs


def test_yaml_base_with_cli_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("beta: 0.3\nloss_type: [sigmoid, hinge]\nloss_weights: [0.5, 0.5]\npoet: true\n")
    cfg = parse_config(["--config", str(cfg_file), "--beta", "0.2", "--output_dir", str(tmp_path / "o")])
    assert cfg.beta == 0.2 and cfg.loss_type == ["sigmoid", "hinge"] and cfg.poet is True


def test_demo_preset_applies_only_without_model_and_data(tmp_path):
    demo = parse_config(["--max_steps", "3"], demo=True)
    assert demo.use_peft is True and demo.max_steps == 3 and demo.output_dir == "outputs/demo"
    user = parse_config(["--dataset_name", "x.jsonl", "--output_dir", str(tmp_path)], demo=True)
    assert user.use_peft is False


@pytest.mark.parametrize("argv, match", [
    (["train", "--learning_rat", "1e-5"], "unknown option --learning_rat; did you mean --learning_rate"),
    (["train", "--beta", "-1", "--dataset_name", "x.jsonl"], "--beta: must be positive"),
    (["train", "--granularity", "adaptive", "--num_segments", "0", "--dataset_name", "x"], "--num_segments"),
    (["train", "--pad_to_multiple_of", "0", "--dataset_name", "x"], "--pad_to_multiple_of: must be a positive integer, got 0"),
    (["train", "--dataset_name", "/no/such/file.jsonl", "--model_name_or_path", "/no/model"], "prefkit: error"),
    (["train", "--learning_rate", "nan", "--dataset_name", "x"], "--learning_rate: must be a finite number, got nan"),
    (["train", "--beta=inf", "--dataset_name", "x"], "--beta: must be a finite number, got inf"),
    # TrainingArguments' own validation, on one line
    (["train", "--load_best_model_at_end", "--eval_strategy", "steps", "--save_strategy", "epoch",
      "--dataset_name", "x"], "prefkit: error: --load_best_model_at_end requires"),
    (["train", "--lr_scheduler_type", "bogus", "--dataset_name", "x"], "invalid choice: 'bogus'"),
])
def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys, argv, match):
    code = main(argv + ["--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and match in err and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error" in ln] == [err.splitlines()[-1]]


@pytest.mark.slow
def test_subprocess_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    proc = subprocess.run([sys.executable, "-m", "prefkit", "train", "--dataset_name", str(bad),
                           "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_output_dir_not_overwritten(tmp_path, model_dir, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    data = write_pairs(tmp_path / "p.jsonl", 12)
    assert main(_train_args(model_dir, data, out)) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_golden_seeded_run_and_plots_and_cached_reference(tmp_path, model_dir, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 20)
    a, b = tmp_path / "a", tmp_path / "b"
    cache = tmp_path / "refcache"
    extra = ["--max_steps", "3", "--precompute_ref_log_probs", "true", "--ref_cache_dir", str(cache)]
    assert main(_train_args(model_dir, data, a, *extra)) == 0
    assert len(list(cache.iterdir())) == 1
    assert main(_train_args(model_dir, data, b, *extra)) == 0  # cache hit
    assert len(list(cache.iterdir())) == 1
    la, lb = _losses(a), _losses(b)
    assert la == lb  # same seed, same config: same losses
    # precomputed reference = on-the-fly reference
    c = tmp_path / "c"
    assert main(_train_args(model_dir, data, c, "--max_steps", "3")) == 0
    assert _losses(c) == pytest.approx(la, rel=1e-5)
    capsys.readouterr()
    assert main(["plot", str(a), str(b), "--out_dir", str(tmp_path / "plots")]) == 0
    pngs = capsys.readouterr().out.split()
    assert any(p.endswith("loss.png") for p in pngs) and all(Path(p).stat().st_size > 1000 for p in pngs)


@pytest.mark.slow
def test_cached_reference_under_bf16_autocast_equals_on_the_fly_reference(tmp_path, model_dir):
    """--bf16: the reference pass for the cache runs under the same autocast as training (its own cache entry)."""
    data = write_pairs(tmp_path / "p.jsonl", 20)
    cache = tmp_path / "refcache"
    bf16 = ["--max_steps", "3", "--bf16", "true", "--use_cpu", "true"]
    cached = ["--precompute_ref_log_probs", "true", "--ref_cache_dir", str(cache)]
    assert main(_train_args(model_dir, data, tmp_path / "fp32", "--max_steps", "3", "--bf16", "false", *cached)) == 0
    assert main(_train_args(model_dir, data, tmp_path / "a", *bf16, *cached)) == 0
    assert len(list(cache.iterdir())) == 2
    assert main(_train_args(model_dir, data, tmp_path / "b", *bf16)) == 0
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_with_checkpoint_or_skips(tmp_path, model_dir, capsys, monkeypatch):
    poison_loss(monkeypatch)
    data = write_pairs(tmp_path / "p.jsonl", 12)
    out = tmp_path / "nan"
    assert main(_train_args(model_dir, data, out, "--eval_split_size", "0")) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 0, dataset rows" in err
    assert (out / "checkpoint-0" / "prefkit_checkpoint_complete").is_file()
    skip = tmp_path / "skip"
    assert main(_train_args(model_dir, data, skip, "--eval_split_size", "0", "--nan_policy", "skip",
                            "--max_steps", "2")) == 0


@pytest.mark.slow
def test_incomplete_checkpoint_is_never_resumed(tmp_path, model_dir, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 12)
    out = tmp_path / "run"
    assert main(_train_args(model_dir, data, out, "--eval_split_size", "0")) == 0
    (out / "checkpoint-6" / "prefkit_checkpoint_complete").unlink()  # as if killed mid-save
    from prefkit.config import PrefConfig
    from prefkit.run import resolve_checkpoint

    cfg = PrefConfig(output_dir=str(out), resume_from_checkpoint="latest")
    assert resolve_checkpoint(cfg).endswith("checkpoint-3")


@pytest.mark.slow
def test_critical_tokens_command_writes_aligned_weights(tmp_path, model_dir, capsys):
    data = write_pairs(tmp_path / "p.jsonl", 6)
    out = tmp_path / "weighted.jsonl"
    assert main(["critical-tokens", "--positive_model", str(model_dir), "--negative_model", str(model_dir),
                 "--dataset_name", str(data), "--output_file", str(out), "--max_length", "64"]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 6
    # positive = negative model: softmax(2·l − l) = softmax(l), so s_t = p(y_t) and a rejected token's weight is
    # 1 − exp(its log-prob), computed here through the training path's log-probs; chosen weights are 1
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefkit.data import PairCollator, load_rows, prepare_dataset
    from prefkit.logprobs import compute_pair_logps

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = parse_config(["--dataset_name", str(data), "--max_length", "64", "--output_dir", str(tmp_path / "o")])
    ds, _ = prepare_dataset(load_rows(str(data)), tok, cfg, source="p")
    with torch.no_grad():
        lp = compute_pair_logps(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                PairCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(len(ds))]))
    for i, r in enumerate(rows):
        want = (1 - lp.rejected[i][lp.rejected_mask[i]].exp()).tolist()
        assert r["rejected_token_weights"] == pytest.approx(want, abs=1e-5), i
        assert r["chosen_token_weights"] == [1.0] * len(r["chosen_token_weights"])
    assert main(_train_args(model_dir, out, tmp_path / "cadpo", "--use_token_weights", "true", "--max_steps", "2",
                            "--granularity", "adaptive", "--num_segments", "2", "--eval_split_size", "0")) == 0
