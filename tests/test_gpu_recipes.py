"""The GPU recipes (benchmarks/gpu/) and the controlled HH-RLHF bench config (benchmarks/bench_hh.yaml).

Each recipe config is parsed with prefkit's own parser, its paper values are checked, and it trains one step
on the tiny test model with the same options except: model, data, output dir, max_steps=1,
gradient_accumulation_steps=1, use_cpu, eval size, and the reference cache dir (PREFKIT_CACHE).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefkit.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
RECIPES = sorted(GPU.glob("*.yaml"))

# the values each recipe must carry (sources in the configs' comments and docs/gpu.md)
EXPECTED = {
    "adpo_gsm8k_llama3_8b.yaml": {"granularity": "adaptive", "num_segments": 256, "loss_type": ["sigmoid"],
                                  "beta": 0.1, "learning_rate": 4e-5, "use_peft": True, "lora_r": 16},
    "poet_ultrafeedback_dpo.yaml": {"poet": True, "loss_type": ["sigmoid"], "beta": 0.01, "learning_rate": 5e-7,
                                    "lr_scheduler_type": "cosine", "max_length": 2048, "use_peft": False},
    "poet_ultrafeedback_simpo.yaml": {"poet": True, "loss_type": ["simpo"], "beta": 2.0, "simpo_gamma": 1.0,
                                      "learning_rate": 6e-7, "max_length": 2048, "use_peft": False},
}


def test_every_recipe_is_checked():
    assert sorted(p.name for p in RECIPES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_with_the_papers_values(path: Path):
    cfg = parse_config(["--config", str(path)])
    for key, want in EXPECTED[path.name].items():
        got = getattr(cfg, key)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), key
    # global batch 128 on 4 GPUs for the POET runs, as the authors'
    if path.name.startswith("poet"):
        assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 4 == 128


def _pairs(n: int) -> list[dict]:
    words = "the cat sat on the mat . a dog ran home quickly".split()
    rows = []
    for i in range(n):
        chosen = " ".join(words[: 3 + i % 5])
        rows.append({"chosen": [{"role": "user", "content": f"what is {i % 9} ?"},
                                {"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "user", "content": f"what is {i % 9} ?"},
                                  {"role": "assistant", "content": "no " + " ".join(words[: 1 + i % 3])}]})
    return rows


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
@pytest.mark.slow
def test_recipe_trains_one_step_on_the_tiny_model(path: Path, tmp_path: Path, model_dir: Path, tmp_jsonl,
                                                  monkeypatch):
    from prefkit.run import train_main

    monkeypatch.setenv("PREFKIT_CACHE", str(tmp_path / "cache"))
    # conversational pairs without a prompt column: the format the UltraFeedback conversion writes
    train = tmp_jsonl(_pairs(8), "train.jsonl")
    held = tmp_jsonl(_pairs(4), "eval.jsonl")
    argv = ["--config", str(path), "--model_name_or_path", str(model_dir), "--dataset_name", str(train),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--gradient_accumulation_steps", "1",
            "--use_cpu", "true"]
    cfg0 = parse_config(["--config", str(path)])
    if cfg0.eval_dataset_name:
        argv += ["--eval_dataset_name", str(held)]
    else:
        argv += ["--eval_split_size", "2"]
    out = train_main(parse_config(argv))
    assert out["train"]["train_loss"] > 0 and out["after"] is not None
    logs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logs, "no metrics logged"


def test_recipe_scripts_call_the_checked_configs():
    adpo = (GPU / "adpo_gsm8k.sh").read_text()
    assert "adpo_gsm8k_llama3_8b.yaml" in adpo and "prefkit pairs" in adpo and "--scorer math" in adpo
    poet = (GPU / "poet_ultrafeedback.sh").read_text()
    assert "poet_ultrafeedback_$objective.yaml" in poet and "--poet \"$poet\"" in poet


# ---- B1 (HH-RLHF), controlled ------------------------------------------------------------------------------

def test_the_seed_alone_decides_the_lora_initialisation(model_dir: Path, tmp_path: Path):
    """Every method at seed s starts from the same LoRA adapters, whatever its other options or what ran before."""
    from prefkit.runsetup import load_model_and_tokenizer

    def lora(seed: int, *extra: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + len(extra))  # whatever ran before must not matter
        cfg = parse_config(["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path), "--use_peft",
                            "true", "--seed", str(seed), *extra])
        _, model, _ = load_model_and_tokenizer(cfg)
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}

    dpo = lora(0)
    others = [lora(0, "--granularity", "adaptive", "--num_segments", "16"), lora(0, "--poet", "true"),
              lora(0, "--reward_calibration", "true", "--learning_rate", "1e-4")]
    assert dpo and all(o.keys() == dpo.keys() for o in others)
    assert all(torch.equal(o[k], dpo[k]) for o in others for k in dpo)
    seed1 = lora(1)
    assert any(not torch.equal(seed1[k], dpo[k]) for k in dpo if "lora_A" in k)


def test_bench_hh_config_methods_are_train_options():
    from prefkit.bench.config import load_bench_config

    bench = load_bench_config(str(ROOT / "benchmarks" / "bench_hh.yaml"))  # resolves every method's options
    assert len(bench.seeds) >= 3 and bench.uses_critical_tokens()
    assert bench.methods["DPO+RC alpha=1"]["rc_fixed_alpha"] == 1.0


@pytest.mark.parametrize("method, match", [
    ("{rc_fixed_alpha: 1.0}", r"--rc_fixed_alpha: .*--reward_calibration"),
    ("{no_such_option: 1}", r"unknown option --no_such_option"),
    ("{beta: lots}", r"--beta: 'lots' is not a valid value"),
    ("{loss_type: [sigmoid, nope]}", r"--loss_type: unknown value 'nope'"),
    ("{beta: -1.0}", r"--beta: must be positive"),
])
@pytest.mark.parametrize("sweep", [False, True])
def test_bench_config_refuses_a_bad_method_option_at_load(tmp_path: Path, method: str, match: str, sweep: bool):
    from prefkit.bench.config import load_bench_config
    from prefkit.errors import ConfigError

    cfg = tmp_path / "b.yaml"
    cfg.write_text("name: x\ntask: preference\n" + ("sweep: {learning_rate: [0.1]}\n" if sweep else "")
                   + f"methods:\n  ok: {{}}\n  bad: {method}\n")
    where = r" at \{'learning_rate': 0\.1\}" if sweep else ""
    with pytest.raises(ConfigError, match=rf"b\.yaml: methods\.bad{where}: {match}"):
        load_bench_config(str(cfg))


@pytest.mark.slow
def test_rc_fixed_alpha_one_in_the_bench_holds_alpha_at_one_and_gives_dpos_losses(tmp_path: Path, model_dir: Path, tmp_jsonl):
    from prefkit.bench.config import load_bench_config
    from prefkit.bench.runner import run_one
    from prefkit.bench.tasks import Setup
    from prefkit.plot import read_metrics

    text = [{"prompt": f"what is {i} ?", "chosen": "the cat sat on the mat", "rejected": "no dog"} for i in range(8)]
    train, held = tmp_jsonl(text, "t.jsonl"), tmp_jsonl(text[:4], "e.jsonl")
    cfg = tmp_path / "b.yaml"
    cfg.write_text("name: x\ntask: preference\ntrain: {learning_rate: 0.05, per_device_train_batch_size: 2, "
                   "logging_steps: 1, dynamics_steps: 1, max_steps: 4}\nmethods:\n  DPO: {}\n"
                   "  RC: {reward_calibration: true}\n  RC1: {reward_calibration: true, rc_fixed_alpha: 1.0}\n")
    bench = load_bench_config(str(cfg))
    setup = Setup(model_path=str(model_dir), train_file=str(train), eval_file=str(held))
    logs = {}
    for m in ("DPO", "RC", "RC1"):
        run_one(bench, setup, m, 0, tmp_path / m)
        logs[m] = read_metrics(str(tmp_path / m))
    loss = {m: [r["loss"] for r in logs[m] if "loss" in r] for m in logs}
    alpha = {m: [r["rc/alpha"] for r in logs[m] if "rc/alpha" in r] for m in ("RC", "RC1")}
    assert alpha["RC1"] and all(a == 1.0 for a in alpha["RC1"])
    assert any(a != 1.0 for a in alpha["RC"])  # the control holds something RC does move
    assert loss["RC1"] == loss["DPO"] and loss["RC"] != loss["DPO"]


@pytest.mark.slow
def test_preference_task_computes_critical_token_weights(tmp_path: Path, model_dir: Path, tmp_jsonl):
    """cADPO on a pairs-only task: LoRA copies tuned on chosen / rejected responses score every response token."""
    import gzip

    from prefkit.bench.config import load_bench_config
    from prefkit.bench.tasks import prepare_preference

    rows = [{"chosen": f"\n\nHuman: what is {i} ?\n\nAssistant: the cat sat on the mat",
             "rejected": f"\n\nHuman: what is {i} ?\n\nAssistant: no dog ran"} for i in range(12)]
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"name: x\ntask: preference\ntask_options: {{data: {data}, train_pairs: 8, eval_pairs: 4, "
                   f"model: {model_dir}, critical_batch_size: 3}}\ntrain: {{max_length: 64}}\n"
                   "methods:\n  cADPO: {critical_tokens: true}\n")
    setup = prepare_preference(load_bench_config(str(cfg)), tmp_path / "setup")
    weighted = [json.loads(line) for line in open(setup.weighted_train_file)]
    assert len(weighted) == 8 and len([*open(setup.weighted_eval_file)]) == 4
    for r in weighted:
        w = r["rejected_token_weights"]
        assert w and all(0.0 <= x <= 1.0 for x in w) and r["chosen_token_weights"] == [1.0] * len(r["chosen_token_weights"])
    assert (tmp_path / "setup" / "critical_pos" / "config.json").is_file()  # merged, loadable as a plain model
    assert any("cADPO weights" in n for n in setup.notes)
