"""`prefkit pairs`: the math checker on hand GSM8K cases, the regex/python/reward-model scorers, the pairing
rules on hand scores, bad input, and an end-to-end run whose pairs `prefkit train` trains on unchanged."""

from __future__ import annotations

import json
import math
import random
import sys
from decimal import Decimal

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from prefkit.cli import main
from prefkit.errors import ConfigError, DataError
from prefkit.pairs.pairing import FALLBACK, pair_samples
from prefkit.pairs.pipeline import Summary
from prefkit.pairs.sample import check_backend
from prefkit.pairs.scorers import Item, ScorerError, build_scorer, final_number, math_equal

GSM_REF = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
           "in April and May.\n#### 72")


@pytest.mark.parametrize("completion, reference, want", [
    ("She sold 48 + 24 = 72 clips.", GSM_REF, True),                   # last number vs GSM8K's #### answer
    ("48 + 24 = 72, so the answer is 72.", "72", True),               # trailing period
    ("so 71 clips", GSM_REF, False),
    ("The total is $1,234.", "#### 1234", True),                       # $ and thousands separator
    ("#### 1,234", "1234", True),                                      # #### in the completion wins
    ("That is 18.0 dollars", "18", True),                              # trailing .0
    ("3.50", "3.5", True),
    ("\\boxed{72} (check: 24 + 48 = 72 and 3 more)", "72", True),      # final \boxed{} wins over later numbers
    ("first \\boxed{5} then \\boxed{\\$3{,}000}", "3000", True),         # last \boxed, LaTeX thousands, \$
    ("\\boxed{\\frac{1}{2}}", "2", True),                              # last number inside the box
    ("-5 degrees", "#### -5", True),
    ("no number at all", "7", False),
    ("12", "no answer in the reference", False),
    # the bench GSM8K task's former checker: the first number after the last "A:" (its prompt's answer line)
    ("She makes 9 * 2 = $18\nA: 18", "#### 18", True),
    ("A: 18 dollars, 3 times a day", "18", True),                      # "A:" wins over later numbers
    ("so 1,234 total\n#### 1,234", "A: 1234", True),                   # either marker, either side
    ("A: 5\nA: 7", "7", True),                                         # the last marker
    ("the answer is 7.5 dollars", "7.5", True),
    ("In the USA: 3 states, 4 cities", "4", True),                     # "USA:" is not a marker
    ("A: none\nso 12 in all", "12", True),                             # no number after it: the last number
    ("Janet sells 9 eggs.\nShe makes $<<9*2=18>>18.\nA: 18", "18", True),  # GSM8K's calculator annotations
])
def test_math_scorer_hand_cases(completion, reference, want):
    assert math_equal(completion, reference) is want


def test_final_number_normalises():
    assert final_number("is $1,000,000.00.") == Decimal(1000000)
    assert final_number("#### 72") == 72 and final_number("x = .5") == Decimal("0.5")
    assert final_number("nothing") is None
    assert final_number("She makes 9 * 2 = $18\nA: 18") == 18 and final_number("A: -3.50") == Decimal("-3.5")


def _items(completions, row=None, row_no=3):
    return [Item("p", "p", c, row or {}, row_no, "prompts.jsonl") for c in completions]


def test_regex_scorer_compares_numbers_and_strings():
    sc = build_scorer(r"regex:A:(-?\d+)", reference_field="answer")
    assert sc.score(_items(["x\nA:07", "A:1\nA:-3", "no answer"], {"answer": 7})) == [1.0, 0.0, 0.0]
    words = build_scorer("regex:(yes|no)$", reference_field="label")
    assert words.score(_items(["I say yes", "no", "yes!"], {"label": "yes"})) == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        build_scorer("regex:(unclosed")
    with pytest.raises(DataError, match=r"prompts.jsonl, row 3, field 'answer'"):
        sc.score(_items(["A:1"], {"other": 1}))


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "import math\n"
        "def length(prompt, completion, row):\n    return float(len(completion.split()))\n"
        "def boom(prompt, completion, row):\n    raise ValueError('bad completion')\n"
        "def nan_on_odd(prompt, completion, row):\n    return math.nan if len(completion) % 2 else 1.0\n"
        "def text(prompt, completion, row):\n    return 'high'\n"
        "def uses_row(prompt, completion, row):\n    return float(row['bonus']) + len(prompt)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scorers"
    sys.modules.pop("my_scorers", None)


def test_python_scorer_calls_user_code_and_names_the_row(scorer_module):
    assert build_scorer(f"python:{scorer_module}:length").score(_items(["a b", "c"])) == [2.0, 1.0]
    assert build_scorer(f"python:{scorer_module}:uses_row").score(_items(["x"], {"bonus": 2})) == [3.0]
    with pytest.raises(ScorerError, match=r"raised ValueError: bad completion on prompt row 3"):
        build_scorer(f"python:{scorer_module}:boom").score(_items(["x"]))
    with pytest.raises(ScorerError, match=r"returned str on prompt row 3"):
        build_scorer(f"python:{scorer_module}:text").score(_items(["x"]))
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        build_scorer("python:no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        build_scorer(f"python:{scorer_module}:missing")
    for bad in ("bogus", "python:", "python:only_module", "regex:", "math:x"):
        with pytest.raises(ConfigError, match="--scorer"):
            build_scorer(bad)


def test_reward_model_scorer_is_the_first_logit_batched(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                      pad_token_id=tiny_tokenizer.pad_token_id)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    completions = ["the cat sat", "a dog ran on the mat quickly", "yes"]
    items = [Item("what is it ?", "what is it ? ", c, {}, i) for i, c in enumerate(completions)]
    got = build_scorer(f"reward_model:{tmp_path / 'rm'}", batch_size=2).score(items)
    for it, g in zip(items, got):
        ids = tiny_tokenizer(it.prompt_text + it.completion, return_tensors="pt").input_ids
        assert g == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-5)
    with pytest.raises(ConfigError, match="cannot load a sequence-classification model"):
        build_scorer(f"reward_model:{tmp_path / 'missing'}")


def _saved_reward_model(path, tokenizer) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return rm


def test_reward_model_scorer_runs_on_the_device_it_is_given(tmp_path, tiny_tokenizer, monkeypatch):
    import prefkit.accel.precision as precision

    rm = _saved_reward_model(tmp_path / "rm", tiny_tokenizer)
    items = [Item("q ?", "q ? ", c, {}, i) for i, c in enumerate(["the cat sat", "a dog ran on the mat", "yes"])]
    scorer = build_scorer(f"reward_model:{tmp_path / 'rm'}", batch_size=2, device=torch.device("cpu"))
    assert {p.device for p in scorer.model.parameters()} == {torch.device("cpu")}
    assert {p.dtype for p in scorer.model.parameters()} == {torch.float32}
    # the path before the scorer took a device: fp32 on the CPU, the same padded batches of 2
    want = []
    for start in (0, 2):
        enc = tiny_tokenizer([it.prompt_text + it.completion for it in items[start : start + 2]],
                             return_tensors="pt", padding=True)
        with torch.no_grad():
            want += rm(**enc).logits[:, 0].tolist()
    assert scorer.score(items) == pytest.approx(want, abs=1e-6)
    assert scorer.score([]) == []
    # bf16 weights only where the run computes in bf16 and the device has native bf16
    emulated = build_scorer(f"reward_model:{tmp_path / 'rm'}", device="cpu", autocast_dtype=torch.bfloat16)
    assert {p.dtype for p in emulated.model.parameters()} == {torch.float32}
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device_type: device_type == "cpu")
    native = build_scorer(f"reward_model:{tmp_path / 'rm'}", device="cpu", autocast_dtype=torch.bfloat16)
    assert {p.dtype for p in native.model.parameters()} == {torch.bfloat16}
    assert native.score(items) == pytest.approx(want, abs=0.05)  # bf16 rounding of a tiny model's score


def test_reward_model_scorer_refuses_cuda_without_a_gpu(tmp_path, tiny_tokenizer, monkeypatch):
    _saved_reward_model(tmp_path / "rm", tiny_tokenizer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--scorer reward_model:.*cuda.* torch sees no CUDA GPU"):
        build_scorer(f"reward_model:{tmp_path / 'rm'}", device="cuda")


def test_pairing_rules_on_hand_scores():
    texts = ["a", "b", "c", "d", "b"]
    scores = [0.5, 1.0, 0.0, 1.0, 1.0]  # "b" twice: counted once; b and d tie
    bw = pair_samples(texts, scores, pairing="best_worst", rng=random.Random(0))
    assert bw.pairs == [(1, 2)] and bw.duplicates == 1 and bw.tied_pairs == 1
    every = pair_samples(texts, scores, pairing="all", rng=random.Random(0))
    assert every.pairs == [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]  # i-major in sample order, no tie (1, 3)
    capped = pair_samples(texts, scores, pairing="all", rng=random.Random(0), max_pairs=2)
    want = list(every.pairs)
    random.Random(0).shuffle(want)
    assert capped.pairs == want[:2]
    rnd = pair_samples(texts, scores, pairing="random", rng=random.Random(1))
    assert len(rnd.pairs) == 1 and rnd.pairs[0] in every.pairs
    tie = pair_samples(["x", "y"], [1.0, 1.0], pairing="best_worst", rng=random.Random(0))
    assert tie.pairs == [] and tie.tied_pairs == 1
    nan = pair_samples(["x", "y", "z"], [math.nan, 0.0, 1.0], pairing="all", rng=random.Random(0))
    assert nan.pairs == [(2, 1)]  # the NaN-scored sample takes part in nothing
    fb = pair_samples(["x", "y"], [0.0, 0.0], pairing="all", rng=random.Random(0), fallback=True)
    assert fb.pairs == [(FALLBACK, 0), (FALLBACK, 1)] and fb.used_fallback


def test_vllm_backend_is_refused_without_vllm_or_gpu():
    with pytest.raises(ConfigError, match="--backend vllm"):
        check_backend("vllm")
    with pytest.raises(ConfigError, match="--backend"):
        check_backend("tgi")


PROMPTS = [{"prompt": "what is the cat ?", "answer": 1}, {"prompt": "the dog ran", "answer": 2},
           {"prompt": [{"role": "user", "content": "is it good ?"}], "answer": 3}]


def _pairs_args(model_dir, prompts, out, scorer, *extra):
    return ["pairs", "--model_name_or_path", str(model_dir), "--prompts", str(prompts), "--num_samples", "6",
            "--scorer", scorer, "--output", str(out), "--max_new_tokens", "8", "--seed", "1", "--batch_size", "2",
            "--use_cpu", *extra]


@pytest.mark.slow
def test_pairs_cli_writes_pairs_that_train_reads_unchanged(model_dir, tmp_jsonl, tmp_path, scorer_module, capsys):
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    assert main(_pairs_args(model_dir, prompts, out, f"python:{scorer_module}:length", "--pairing", "all")) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "prompts with at least one pair" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert rows and summary["pairs"] == len(rows) and summary["prompts"] == 3 and summary["tokens_per_second"] > 0
    for r in rows:  # conversational (the tokenizer has a chat template), with provenance
        assert r["chosen_score"] > r["rejected_score"] and r["chosen_index"] != r["rejected_index"]
        assert r["chosen"][0]["role"] == "assistant" and r["prompt"][0]["role"] == "user"
        assert (r["model"], r["seed"], r["scorer"]) == (str(model_dir), 1, f"python:{scorer_module}:length")
        assert len(r["chosen"][0]["content"].split()) == r["chosen_score"]
    # same seed, same pairs
    again = tmp_path / "again.jsonl"
    assert main(_pairs_args(model_dir, prompts, again, f"python:{scorer_module}:length", "--pairing", "all")) == 0
    assert again.read_text() == out.read_text()
    capsys.readouterr()
    train_out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(out), "--output_dir",
                 str(train_out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                 "--max_length", "64", "--use_cpu", "true", "--report_to", "none"]) == 0
    assert (train_out / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_pairs_cli_errors_are_one_line(model_dir, tmp_jsonl, tmp_path, scorer_module, capsys):
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    assert main(_pairs_args(model_dir, prompts, out, "bogus")) == 2
    assert main(_pairs_args(model_dir, prompts, out, f"python:{scorer_module}:boom")) == 2
    assert main(_pairs_args(model_dir, prompts, out, "math", "--reference_field", "solution")) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("prefkit: error:")]
    assert len(err) == 3 and "Traceback" not in stderr
    assert "unknown spec 'bogus'" in err[0] and "on prompt row 1" in err[1] and "row 1, field 'solution'" in err[2]
    assert not out.exists()
    # NaN scores: the samples are dropped and counted
    assert main(_pairs_args(model_dir, prompts, out, f"python:{scorer_module}:nan_on_odd",
                            "--apply_chat_template", "false", "--max_prompts", "2")) == 0
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["samples"] == 12 and summary["nan_dropped"] > 0
    assert summary["score_histogram"] == {"1": 12 - summary["nan_dropped"]}
    assert all(isinstance(json.loads(line)["prompt"], str) for line in out.read_text().splitlines())


def test_summary_share_correct_follows_the_counts():
    """The share of correct samples is derived, never stored apart from the counts it comes from; the
    summary file still carries it."""
    s = Summary(samples=10, nan_dropped=2, correct=2)
    assert s.share_correct == 0.25  # 2 of the 8 scored samples
    s.correct = 6
    assert s.to_dict()["share_correct"] == 0.75 and Summary().share_correct == 0.0


def test_prompt_token_ids_never_double_bos_and_are_what_generate_gets(tiny_tokenizer):
    from prefkit.pairs.sample import encode_left, prompt_token_ids

    bos = tiny_tokenizer.bos_token_id
    texts = ["what is the cat ?", "<s> <|user|> hello <|end|> <|assistant|>", "yes"]
    ids = prompt_token_ids(tiny_tokenizer, texts)
    assert [x[:2].count(bos) for x in ids] == [1, 1, 1]  # added to plain text, not again to a rendered prompt
    assert ids[1] == tiny_tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    enc = encode_left(tiny_tokenizer, texts, "cpu")
    for row, mask, want in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), ids):
        assert [t for t, m in zip(row, mask) if m] == want and mask == sorted(mask)  # left padding


def test_vllm_gets_the_memory_share_the_converted_model_and_prefkit_prompt_ids(
        model_dir, tmp_jsonl, tmp_path, scorer_module, monkeypatch, capsys, tiny_tokenizer):
    import prefkit.models
    import prefkit.pairs.sample as sample
    from prefkit.pairs.pipeline import render_prompts
    from tests import fake_vllm

    fake, record = fake_vllm.make()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(sample, "cuda_visible", lambda: True)
    converted = []
    monkeypatch.setattr(prefkit.models, "convert_gguf", lambda p: converted.append(p) or str(model_dir))
    gguf = tmp_path / "policy.Q4_1.gguf"
    prompts = tmp_jsonl(PROMPTS, "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    args = ["pairs", "--model_name_or_path", str(gguf), "--prompts", str(prompts), "--num_samples", "3",
            "--scorer", f"python:{scorer_module}:length", "--output", str(out), "--max_new_tokens", "8", "--seed", "1",
            "--backend", "vllm", "--pairing", "all"]
    assert main([*args, "--vllm_gpu_memory_utilization", "0.5"]) == 0
    assert converted and all(p == str(gguf) for p in converted)  # the engine loads the converted directory
    (kwargs,) = record.llm_kwargs
    assert kwargs == {"model": str(model_dir), "seed": 1, "gpu_memory_utilization": 0.5, "dtype": "auto"}
    assert record.params[0].kwargs == {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "seed": 1}
    _, texts = render_prompts(PROMPTS, tiny_tokenizer, prompt_field="prompt", chat="auto", source="")
    assert record.inputs[0] == [{"prompt_token_ids": ids} for ids in sample.prompt_token_ids(tiny_tokenizer, texts)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 3 and json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())["backend"] == "vllm"
    assert main(args) == 0
    assert record.llm_kwargs[-1]["gpu_memory_utilization"] == 0.3  # TRL's default
    capsys.readouterr()
    for bad, msg in ((["--vllm_gpu_memory_utilization", "1.5"], "must be in (0, 1], got 1.5"),
                     (["--backend", "hf", "--vllm_gpu_memory_utilization", "0.5"], "only used with --backend vllm")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert f"prefkit: error: --vllm_gpu_memory_utilization: {msg}" in err and "Traceback" not in err


def test_vllm_default_memory_share_is_trls():
    from trl import GRPOConfig

    from prefkit.config import PrefConfig
    from prefkit.pairs.sample import VLLM_GPU_MEMORY_UTILIZATION

    field = GRPOConfig.__dataclass_fields__["vllm_gpu_memory_utilization"]
    assert VLLM_GPU_MEMORY_UTILIZATION == field.default == PrefConfig.__dataclass_fields__[
        "vllm_gpu_memory_utilization"].default == 0.3
