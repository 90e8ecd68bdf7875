"""Our port of TRL 1.16's DPO trainer tests (tests/test_dpo_trainer.py), test names kept, run against
``PrefTrainer`` / ``PrefConfig`` used the way TRL's users use ``DPOTrainer`` / ``DPOConfig``.

TRL's tests load tiny hub models and the ``zen`` datasets; here the models are tiny random ones built from a
config (saved to tmp_path where a test passes a path) and the datasets are made of the tokenizer's words, so
nothing is downloaded. A feature prefkit claims must pass; a refused one must fail with a ValueError-type
message naming the argument. prefkit's own additions come after the ported tests.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import LlamaConfig, LlamaForCausalLM

from prefkit import PrefConfig as DPOConfig
from prefkit import PrefTrainer as DPOTrainer
from prefkit.errors import ConfigError
from tests.conftest import WORDS, _small, make_tokenizer

LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def standard_rows(n: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))),
             "chosen": " ".join(rng.choices(WORDS[:9], k=rng.randint(2, 6))),
             "rejected": " ".join(rng.choices(WORDS[9:], k=rng.randint(2, 6)))} for _ in range(n)]


def dataset(config_name: str = "standard_preference", n: int = 8, seed: int = 0) -> Dataset:
    """The four preference formats of TRL's ``zen`` test dataset, from the tiny tokenizer's words."""
    rows = standard_rows(n, seed)
    if config_name == "standard_preference":
        return Dataset.from_list(rows)
    if config_name == "standard_implicit_prompt_preference":
        return Dataset.from_list([{"chosen": f"{r['prompt']} {r['chosen']}", "rejected": f"{r['prompt']} {r['rejected']}"}
                                  for r in rows])
    user = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    chosen = [[{"role": "assistant", "content": r["chosen"]}] for r in rows]
    rejected = [[{"role": "assistant", "content": r["rejected"]}] for r in rows]
    if config_name == "conversational_preference":
        return Dataset.from_dict({"prompt": user, "chosen": chosen, "rejected": rejected})
    assert config_name == "conversational_implicit_prompt_preference"
    return Dataset.from_dict({"chosen": [u + c for u, c in zip(user, chosen)],
                              "rejected": [u + r for u, r in zip(user, rejected)]})


def splits() -> DatasetDict:
    return DatasetDict({"train": dataset(n=8, seed=0), "test": dataset(n=4, seed=1)})


@pytest.fixture
def model_id(tmp_path: Path) -> str:
    """A tiny random Llama and its tokenizer saved as a model directory: what a hub id names in TRL's tests."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(**_small(len(tok)), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def training_args(tmp_path: Path):
    def make(**kw) -> DPOConfig:
        defaults = dict(output_dir=str(tmp_path / "out"), learning_rate=0.1, report_to="none", max_steps=2,
                        per_device_train_batch_size=4, per_device_eval_batch_size=4, max_length=64, use_cpu=True,
                        dynamics_steps=0, logging_steps=1)
        return DPOConfig(**{**defaults, **kw})

    return make


def changed(before: dict, trainer, skip=lambda n: False) -> None:
    for n, param in before.items():
        if not skip(n):
            assert not torch.equal(param, trainer.model.get_parameter(n)), f"Parameter {n} has not changed."


def trainable(trainer) -> dict:
    return {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def train_and_check(trainer, skip=lambda n: False) -> None:
    before = trainable(trainer)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    changed(before, trainer, skip)


# ---- TRL's TestDPOTrainer, ported -------------------------------------------------------------------------------

def test_train(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset())
    train_and_check(trainer)


@pytest.mark.parametrize("precompute_ref_log_probs", [False, True])
@pytest.mark.parametrize("eval_dataset_type", ["dataset", "iterable_dataset", "dataset_dict", "dict_of_dataset"])
def test_evaluate_with_eval_dataset(model_id, training_args, eval_dataset_type, precompute_ref_log_probs):
    eval_split = dataset(n=4, seed=1)
    if eval_dataset_type == "dataset":
        eval_dataset = eval_split
    elif eval_dataset_type == "iterable_dataset":
        eval_dataset = eval_split.to_iterable_dataset()
    elif eval_dataset_type == "dataset_dict":
        eval_dataset = DatasetDict({"data1": eval_split, "data2": eval_split})
    else:
        eval_dataset = {"data1": eval_split, "data2": eval_split}
    args = training_args(precompute_ref_log_probs=precompute_ref_log_probs,
                         ref_cache_dir=str(Path(training_args().output_dir).parent / "cache"))
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=dataset())
    if eval_dataset_type == "iterable_dataset":  # refused by prefkit (TRL evaluates streamed sets)
        with pytest.raises(ValueError, match="IterableDataset"):
            trainer.evaluate(eval_dataset=eval_dataset)
        return
    metrics = trainer.evaluate(eval_dataset=eval_dataset)
    if eval_dataset_type == "dataset":
        assert metrics["eval_loss"] is not None
        assert "eval_rewards/accuracies" in metrics
    else:
        assert metrics["eval_data1_loss"] is not None and metrics["eval_data2_loss"] is not None
        assert "eval_data1_rewards/margins" in metrics and "eval_rewards/margins" not in metrics


def test_evaluate_precompute_ref_log_probs_after_training_raises(model_id, training_args, tmp_path):
    args = training_args(max_steps=1, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=dataset())
    eval_dataset = dataset(n=4, seed=1)
    assert trainer.evaluate(eval_dataset=eval_dataset)["eval_loss"] is not None  # before training: the reference
    trainer.train()
    with pytest.raises(ValueError, match="cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(eval_dataset=eval_dataset)


@pytest.mark.parametrize("eval_dataset_type", ["dataset", "dataset_dict", "dict_of_dataset"])
def test_evaluate_precompute_ref_log_probs_at_init_after_training(model_id, training_args, tmp_path,
                                                                   eval_dataset_type):
    eval_split = dataset(n=4, seed=1)
    eval_dataset = {"dataset": eval_split, "dataset_dict": DatasetDict({"data1": eval_split, "data2": eval_split}),
                    "dict_of_dataset": {"data1": eval_split, "data2": eval_split}}[eval_dataset_type]
    args = training_args(max_steps=1, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=dataset(), eval_dataset=eval_dataset)
    trainer.train()
    metrics = trainer.evaluate()
    if eval_dataset_type == "dataset":
        assert metrics["eval_loss"] is not None
    else:
        assert metrics["eval_data1_loss"] is not None and metrics["eval_data2_loss"] is not None


@pytest.mark.parametrize("config_name", ["standard_preference", "conversational_preference",
                                         "standard_implicit_prompt_preference",
                                         "conversational_implicit_prompt_preference"])
def test_train_dataset_format(model_id, training_args, config_name):
    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset(config_name))
    train_and_check(trainer)


def test_train_model(tiny_llama, tiny_tokenizer, training_args):
    trainer = DPOTrainer(model=tiny_llama, args=training_args(), train_dataset=dataset(),
                         processing_class=tiny_tokenizer)
    train_and_check(trainer)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_train_loss_types(model_id, training_args, loss_type):
    data = splits()
    args = training_args(loss_type=loss_type, label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0,
                         eval_strategy="steps", eval_steps=1)
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=data["train"], eval_dataset=data["test"])
    train_and_check(trainer)


def test_train_multi_loss_types(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(loss_type=["sigmoid", "bco_pair", "sft"]),
                         train_dataset=dataset())
    train_and_check(trainer)


def test_train_with_wpo(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(use_weighting=True), train_dataset=dataset())
    train_and_check(trainer)


def test_train_with_ld(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(ld_alpha=0.5), train_dataset=dataset())
    train_and_check(trainer)


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_train_with_f_divergence(model_id, training_args, f_divergence_type):
    trainer = DPOTrainer(model=model_id, args=training_args(f_divergence_type=f_divergence_type),
                         train_dataset=dataset())
    train_and_check(trainer)


def test_train_with_explicit_ref_model(model_id, training_args):
    ref_model = LlamaForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    trainer = DPOTrainer(model=model_id, ref_model=ref_model, args=training_args(), train_dataset=dataset())
    before = trainable(trainer)
    trainer.train()
    changed(before, trainer)
    for n, param in before.items():
        torch.testing.assert_close(param, trainer.ref_model.get_parameter(n))


def test_train_with_sync_ref_model(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(sync_ref_model=True, ref_model_sync_steps=2),
                         train_dataset=dataset())
    assert trainer.ref_model is not None
    ref_before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    train_and_check(trainer)
    for n, p in ref_before.items():
        assert not torch.equal(p, trainer.ref_model.get_parameter(n)), f"Ref Parameter {n} has not changed."


def test_train_model_dtype(model_id, training_args):
    args = training_args(model_init_kwargs={"dtype": torch.bfloat16})
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=dataset())
    assert args.dtype == "bfloat16"
    before = trainable(trainer)
    trainer.train()
    for n in before:
        assert trainer.model.get_parameter(n).dtype == torch.bfloat16
    changed(before, trainer, skip=lambda n: "norm" in n)  # tiny bf16 updates of norms round away


def _base_names(model_id: str) -> set[str]:
    return {f"base_model.model.{n}" for n, _ in LlamaForCausalLM.from_pretrained(model_id).named_parameters()}


def test_train_dense_with_peft_config_lora(model_id, training_args):
    from peft import LoraConfig

    base = _base_names(model_id)
    trainer = DPOTrainer(model=model_id, args=training_args(learning_rate=1.0), train_dataset=dataset(),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None  # the reference is the base with adapters disabled, as with --use_peft
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in before.items():
        if n in base:
            torch.testing.assert_close(p, trainer.model.get_parameter(n))
        elif "base_layer" not in n:
            assert not torch.equal(p, trainer.model.get_parameter(n)), f"Parameter {n} has not changed."


def test_train_peft_model(model_id, training_args):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_id), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = DPOTrainer(model=model, args=training_args(learning_rate=1.0), train_dataset=dataset())
    assert trainer.ref_model is None
    train_and_check(trainer, skip=lambda n: "lora" not in n)


def test_train_with_peft_config_and_gradient_checkpointing(model_id, training_args):
    from peft import LoraConfig

    trainer = DPOTrainer(model=model_id, args=training_args(gradient_checkpointing=True), train_dataset=dataset(),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train_and_check(trainer, skip=lambda n: "lora" not in n)


def test_train_with_liger(model_id, training_args):
    with pytest.raises(ValueError, match="use_liger_kernel"):
        training_args(use_liger_kernel=True)


@pytest.mark.parametrize("iterable_as", ["train", "eval", "eval_dict"])
def test_precompute_ref_log_probs_raises_for_iterable_dataset(model_id, training_args, iterable_as):
    iterable = dataset().to_iterable_dataset()
    train_dataset, eval_dataset = dataset(), None
    if iterable_as == "train":
        train_dataset = iterable
    elif iterable_as == "eval":
        eval_dataset = iterable
    else:
        eval_dataset = {"eval": iterable}
    with pytest.raises(ValueError, match="IterableDataset"):
        DPOTrainer(model=model_id, args=training_args(max_steps=1, precompute_ref_log_probs=True),
                   train_dataset=train_dataset, eval_dataset=eval_dataset)


def test_train_with_iterable_dataset(model_id, training_args):
    # refused by prefkit, which tokenizes and checks every pair before training (TRL trains on a stream)
    with pytest.raises(ValueError, match="train_dataset: an IterableDataset"):
        DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset().to_iterable_dataset())


def test_train_padding_free(model_id, training_args, monkeypatch):
    import prefkit.layouts
    from prefkit.accel.attention import register_segment_attention

    args = training_args(padding_free=True)
    assert args.pack_pairs is True
    # packing needs the segment attention that prefkit.accel.install (the host layer) registers
    monkeypatch.setattr(prefkit.layouts, "segment_attention_registered", lambda: False)
    with pytest.raises(ValueError, match="prefkit.accel.install"):
        DPOTrainer(model=model_id, args=args, train_dataset=dataset())
    monkeypatch.undo()
    register_segment_attention()
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=dataset())
    assert trainer.layout.pack_pairs
    train_and_check(trainer)


def test_train_with_chat_template_kwargs(model_id, training_args):
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {% if loud %}yes {% endif %}{{ m['content'] }} "
                         "<|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    data = dataset("conversational_preference")
    data = data.add_column("chat_template_kwargs", [{"loud": bool(i % 2)} for i in range(len(data))])
    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=data, processing_class=tok)
    assert tok.convert_tokens_to_ids("yes") in trainer.train_dataset[1]["prompt_ids"]


def test_fully_truncated_completion_examples_dropped(model_id, training_args):
    data = Dataset.from_dict({"prompt": ["hello", "the cat sat on the mat under the big red log"],
                              "chosen": [" yes", " yes"], "rejected": [" no", " no"]})
    trainer = DPOTrainer(model=model_id, args=training_args(max_length=6, truncation_mode="keep_start"),
                         train_dataset=data)
    assert len(trainer.train_dataset) == 1
    assert trainer.skip_reports["train"].skipped
    ids = trainer.processing_class("hello")["input_ids"]
    assert trainer.train_dataset[0]["prompt_ids"] == ids


def test_train_with_eval(model_id, training_args):
    data = splits()
    trainer = DPOTrainer(model=model_id, args=training_args(eval_strategy="steps", eval_steps=1),
                         train_dataset=data["train"], eval_dataset=data["test"])
    trainer.train()
    assert next(r for r in trainer.state.log_history if "eval_loss" in r)["eval_loss"] is not None


def test_train_with_multiple_eval_dataset(model_id, training_args):
    data = splits()
    trainer = DPOTrainer(model=model_id, args=training_args(eval_strategy="steps", eval_steps=2),
                         train_dataset=data["train"], eval_dataset={"data1": data["test"], "data2": data["test"]})
    trainer.train()
    assert trainer.state.log_history[-3]["eval_data1_loss"] is not None
    assert trainer.state.log_history[-2]["eval_data2_loss"] is not None
    assert "eval_data2_rewards/accuracies" in trainer.state.log_history[-2]


def test_train_dataset_required(model_id, training_args):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        DPOTrainer(model=model_id, args=training_args())


@pytest.mark.parametrize("eval_dataset_type", ["dataset", "iterable_dataset", "dataset_dict", "dict_of_dataset",
                                               "none"])
def test_init_with_eval_dataset(model_id, training_args, eval_dataset_type):
    eval_split = dataset(n=4, seed=1)
    eval_dataset = {"dataset": eval_split, "iterable_dataset": eval_split.to_iterable_dataset(),
                    "dataset_dict": DatasetDict({"data1": eval_split, "data2": eval_split}),
                    "dict_of_dataset": {"data1": eval_split, "data2": eval_split}, "none": None}[eval_dataset_type]
    if eval_dataset_type == "iterable_dataset":
        with pytest.raises(ValueError, match="eval_dataset: an IterableDataset"):
            DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset(), eval_dataset=eval_dataset)
        return
    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset(), eval_dataset=eval_dataset)
    if eval_dataset_type == "none":
        assert trainer.eval_dataset is None
    elif isinstance(trainer.eval_dataset, dict):
        assert set(trainer.eval_dataset) == {"data1", "data2"}
        assert all("prompt_ids" in ds.column_names for ds in trainer.eval_dataset.values())
        assert set(trainer.skip_reports) == {"train", "eval_data1", "eval_data2"}
    else:
        assert "prompt_ids" in trainer.eval_dataset.column_names


def test_train_with_compute_metrics(model_id, training_args):
    data = splits()
    seen = []

    def dummy_compute_metrics(eval_pred):
        seen.append(eval_pred)
        return {"my_metric": 0.123}

    trainer = DPOTrainer(model=model_id, args=training_args(eval_strategy="steps", eval_steps=2),
                         train_dataset=data["train"], eval_dataset=data["test"], compute_metrics=dummy_compute_metrics)
    trainer.train()
    assert trainer.state.log_history[-2]["eval_my_metric"] == 0.123
    # the predictions are each pair's implicit rewards (chosen, rejected), the labels 0 (the chosen response)
    assert seen[0].predictions.shape == (4, 2) and (seen[0].label_ids == 0).all()


def test_train_with_gradient_checkpointing(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(gradient_checkpointing=True), train_dataset=dataset())
    train_and_check(trainer)


def test_tag_added(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset())
    assert "prefkit" in trainer.model.model_tags


def test_tag_added_peft(model_id, training_args):
    from peft import LoraConfig

    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset(),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    assert "prefkit" in trainer.model.model_tags


# ---- prefkit's own checks of the DPOTrainer-style API -----------------------------------------------------------

def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_ref_model_is_model_refused(tiny_llama, tiny_tokenizer, training_args):
    with pytest.raises(ValueError, match="ref_model: the same object as model"):
        DPOTrainer(model=tiny_llama, ref_model=tiny_llama, args=training_args(), train_dataset=dataset(),
                   processing_class=tiny_tokenizer)


def test_model_instance_without_path_needs_processing_class(tiny_llama, training_args):
    with pytest.raises(ValueError, match="processing_class: not given"):
        DPOTrainer(model=tiny_llama, args=training_args(), train_dataset=dataset())


def test_model_instance_from_a_path_gets_its_tokenizer(model_id, training_args):
    trainer = DPOTrainer(model=LlamaForCausalLM.from_pretrained(model_id), args=training_args(),
                         train_dataset=dataset())
    assert trainer.processing_class.convert_tokens_to_ids("cat") == make_tokenizer().convert_tokens_to_ids("cat")


def test_loss_weights_message_is_the_command_lines(model_id, training_args, tmp_path, capsys):
    from prefkit.cli import main

    with pytest.raises(ValueError) as python:
        DPOTrainer(model=model_id, args=training_args(loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
                   train_dataset=dataset())
    assert main(["train", "--model_name_or_path", model_id, "--output_dir", str(tmp_path / "cli"),
                 "--loss_type", "sigmoid", "sft", "--loss_weights", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"prefkit: error: {python.value}"
    assert str(python.value) == "--loss_weights: 1 weights for 2 loss types"


def test_loss_weights_of_the_wrong_length_refused_where_the_config_is_built():
    with pytest.raises(ValueError, match=r"^--loss_weights: 1 weights for 2 loss types$"):
        DPOConfig(output_dir="unused", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    assert DPOConfig(output_dir="unused", loss_type="sigmoid,sft", loss_weights=[1.0, 0.5]).loss_weights == [1.0, 0.5]


@pytest.mark.parametrize("argument, kwargs, match", [
    ("data_collator", {"data_collator": lambda rows: rows}, "data_collator: a function"),
    ("peft_config", {"peft_config": {"r": 4}}, "peft_config: must be a peft config"),
    ("quantization_config", {"quantization_config": object()}, "quantization_config: the model is already loaded"),
    ("train_dataset", {"train_dataset": [{"prompt": "a", "chosen": "b", "rejected": "c"}]},
     "train_dataset: must be a datasets.Dataset"),
    ("train_dataset", {"train_dataset": splits()}, "train_dataset: a dict of datasets"),
])
def test_arguments_that_cannot_be_honoured_are_refused(tiny_llama, tiny_tokenizer, training_args, argument, kwargs,
                                                       match):
    base = dict(model=tiny_llama, args=training_args(), train_dataset=dataset(), processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match=match):
        DPOTrainer(**{**base, **kwargs})


def test_peft_config_with_a_peft_model_refused(model_id, training_args):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_id), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has adapters"):
        DPOTrainer(model=model, args=training_args(), train_dataset=dataset(), peft_config=LoraConfig(r=2))


def test_use_peft_in_python_applies_lora(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(use_peft=True, lora_r=2, lora_target_modules=["q_proj"]),
                         train_dataset=dataset())
    assert trainer.model.peft_config["default"].r == 2 and trainer.ref_model is None


@pytest.mark.parametrize("kwargs, match", [
    ({"model_init_kwargs": {"device_map": "auto"}}, "'device_map' is not passed on"),
    ({"model_init_kwargs": {"dtype": "bfloat16"}, "dtype": "float32"}, "give one of them"),
])
def test_model_init_kwargs_refusals(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(output_dir=str(tmp_path), **kwargs)


def test_model_init_kwargs_same_on_the_command_line(tmp_path):
    from prefkit.trl_compat import normalize_argv

    argv = normalize_argv(["--model_init_kwargs", json.dumps({"dtype": "bfloat16", "attn_implementation": "eager",
                                                               "revision": "v1", "trust_remote_code": True})])
    python = DPOConfig(output_dir=str(tmp_path), model_init_kwargs={"dtype": torch.bfloat16,
                                                                    "attn_implementation": "eager",
                                                                    "revision": "v1", "trust_remote_code": True})
    assert argv == ["--dtype", "bfloat16", "--attn_implementation", "eager", "--model_revision", "v1",
                    "--trust_remote_code", "true"]
    assert (python.dtype, python.attn_implementation, python.model_revision, python.trust_remote_code) == (
        "bfloat16", "eager", "v1", True)


def test_predict_on_raw_rows(model_id, training_args):
    trainer = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset())
    out = trainer.predict(dataset(n=4, seed=2))
    assert out.predictions.shape == (4, 2)
    assert "test_rewards/margins" in out.metrics and out.metrics["test_loss"] > 0
    assert "test" in trainer.skip_reports


def test_precompute_ref_log_probs_builds_no_reference_and_matches_the_cli(model_id, training_args, tmp_path):
    """The same losses as `prefkit train --precompute_ref_log_probs true` on the same model and pairs, from a
    trainer that holds no reference module (the starting policy scored the pairs once, before training)."""
    from prefkit.cli import main

    rows = standard_rows(8)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(max_steps=3, learning_rate=0.05, per_device_train_batch_size=4, max_length=64,
                  dynamics_steps=0, logging_steps=1, seed=0, data_seed=0)
    cli_out = tmp_path / "cli"
    argv = ["train", "--model_name_or_path", model_id, "--dataset_name", str(data), "--output_dir", str(cli_out),
            "--precompute_ref_log_probs", "true", "--ref_cache_dir", str(tmp_path / "cli-cache"),
            "--use_cpu", "true", "--report_to", "none", "--overlap_reference", "false"]
    for k, v in common.items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 0
    cli = [json.loads(ln) for ln in (cli_out / "metrics.jsonl").read_text().splitlines()]

    args = training_args(precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "py-cache"),
                         output_dir=str(tmp_path / "py"), **common)
    trainer = DPOTrainer(model=model_id, args=args, train_dataset=Dataset.from_list(rows))
    assert trainer.ref_model is None
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    assert not any(isinstance(m, torch.nn.Module) and m is not trainer.model and hasattr(m, "lm_head")
                   for m in vars(trainer).values())
    trainer.train()
    py = [json.loads(ln) for ln in (tmp_path / "py" / "metrics.jsonl").read_text().splitlines()]
    cli_losses = [r["loss"] for r in cli if "loss" in r]
    py_losses = [r["loss"] for r in py if "loss" in r]
    assert len(py_losses) == 3
    assert py_losses == pytest.approx(cli_losses, rel=1e-5)


def test_trl_per_response_reference_columns_give_the_loss_of_the_reference_itself(model_id, training_args):
    """TRL's precomputed columns (one log-prob per response) equal to a reference model's sums: the loss is the
    one of a trainer that runs that reference, and no reference module is built."""
    from prefkit.logprobs import compute_pair_logps

    torch.manual_seed(1)
    ref = LlamaForCausalLM(LlamaConfig(**_small(len(make_tokenizer())))).eval()
    with_ref = DPOTrainer(model=model_id, args=training_args(), train_dataset=dataset(), ref_model=ref)
    pairs = [with_ref.train_dataset[i] for i in range(len(with_ref.train_dataset))]
    batch = with_ref.data_collator(pairs)
    with torch.no_grad():
        out = compute_pair_logps(ref, batch)
    sums = {"ref_chosen_logps": (out.chosen * out.chosen_mask).sum(1).tolist(),
            "ref_rejected_logps": (out.rejected * out.rejected_mask).sum(1).tolist()}
    raw = dataset()
    assert len(raw) == len(pairs)
    for name, values in sums.items():
        raw = raw.add_column(name, values)
    columns = DPOTrainer(model=model_id, args=training_args(), train_dataset=raw)
    assert columns.ref_model is None
    assert columns.train_dataset["ref_chosen_logps"] == pytest.approx(sums["ref_chosen_logps"])
    with torch.no_grad():
        want = with_ref.compute_loss(with_ref.model, batch)
        got = columns.compute_loss(columns.model, columns.data_collator(
            [columns.train_dataset[i] for i in range(len(pairs))]))
    assert abs(want.item() - math.log(2)) > 1e-3  # the policy is not the reference: the sums matter
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    train_and_check(columns)


@pytest.mark.parametrize("option", [dict(granularity="adaptive"), dict(poet=True), dict(ld_alpha=0.5)])
def test_trl_per_response_reference_columns_refused_where_tokens_are_needed(model_id, training_args, option):
    raw = dataset(n=2).add_column("ref_chosen_logps", [-1.0, -2.0]).add_column("ref_rejected_logps", [-1.0, -2.0])
    with pytest.raises(ValueError, match=r"train dataset: columns 'ref_chosen_logps'/'ref_rejected_logps' hold one "
                                         r"reference log-prob per response .* needed per token here \(--.*\); drop the columns "
                                         r"so that prefkit computes them \(--precompute_ref_log_probs computes"):
        DPOTrainer(model=model_id, args=training_args(**option), train_dataset=raw)
    # a prepared dataset with them is refused the same way
    prepared = DPOTrainer(model=model_id, args=training_args(), train_dataset=raw).train_dataset
    with pytest.raises(ValueError, match="needed per token here"):
        DPOTrainer(model=model_id, args=training_args(**option), train_dataset=prepared)
    weights = [[1.0] * len(ids) for ids in prepared["rejected_ids"]]
    with pytest.raises(ValueError, match=r"needed per token here \(its token weight columns\)"):
        DPOTrainer(model=model_id, args=training_args(), train_dataset=prepared.add_column(
            "chosen_token_weights", [[1.0] * len(ids) for ids in prepared["chosen_ids"]]).add_column(
            "rejected_token_weights", weights))


EXAMPLE = Path(__file__).parents[1] / "examples" / "python_api.py"


def test_python_api_example_runs_to_the_end(model_id, tmp_path, monkeypatch, capsys):
    """examples/python_api.py (TRL's quickstart with prefkit's imports, LoRA via peft_config) on a tiny model."""
    import runpy

    monkeypatch.setenv("MODEL", model_id)
    monkeypatch.setenv("MAX_STEPS", "1")
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "example"))
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "final loss:" in capsys.readouterr().out
    assert (tmp_path / "example" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.long  # the example on a tiny model runs in make test
def test_python_api_example_on_the_embedded_model(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "MAX_STEPS": "2", "OUTPUT_DIR": str(tmp_path / "example")}
    done = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "final loss:" in done.stdout and (tmp_path / "example" / "adapter_config.json").is_file()


def test_every_dpo_trainer_argument_is_documented_and_taken():
    """Every argument of TRL's DPOTrainer.__init__ is a PrefTrainer argument with a row in docs/trl.md's table,
    which is the one generated from prefkit.trl_compat.CONSTRUCTOR."""
    import inspect

    trl = pytest.importorskip("trl")
    from prefkit.trl_compat import CONSTRUCTOR, CONSTRUCTOR_EXTRA, constructor_table_markdown

    theirs = [p for p in inspect.signature(trl.DPOTrainer.__init__).parameters if p != "self"]
    ours = [p for p in inspect.signature(DPOTrainer.__init__).parameters if p != "self"]
    assert list(CONSTRUCTOR) == theirs
    assert ours[:len(theirs)] == theirs  # the same order: positional calls mean the same
    assert set(ours) == set(CONSTRUCTOR) | set(CONSTRUCTOR_EXTRA)
    assert constructor_table_markdown() in (Path(__file__).parents[1] / "docs" / "trl.md").read_text()
