"""Data that TRL 1.16 reads, read the same way: implicit-prompt whitespace, chat_template_kwargs, generation
prompts that add text, tool calls, TRL's per-response reference columns. Each checked against hand-written
token ids of a tokenizer whose tokens carry their leading whitespace, as BPE vocabularies do."""

from __future__ import annotations

import json
import logging

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefkit.config import PrefConfig
from prefkit.data import load_rows, prepare_dataset
from prefkit.data.formats import split_implicit_prompt
from prefkit.errors import DataError

SPECIALS = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>", "<think>", "</think>",
            "<call>", "</call>"]
WORDS = ["The", " sky", " is", " blue.", " green.", " ", "\n", "\n\n", "Human:", " hi", "Assistant:", " yes", " no",
         "hi", "yes", "no", "add", "3", "<thinker", "<thinking"]
# a generation prompt and a conversation that agree (the messages, then "<|assistant|>\n")
PLAIN = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Qwen3's way: the final assistant turn carries an empty thought block, which the generation prompt adds only
# with enable_thinking=false
QWEN3 = ("{% for m in messages %}<|{{ m.role }}|>\n{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>"
         "\n\n{% endif %}{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
         "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
         "{% endif %}")
# Gemma 4's way: the generation prompt ends with an empty thought block that the conversation never renders
GEMMA = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n<think>\n\n</think>\n\n{% endif %}")
TOOLS = ("{% if tools %}<|system|>\n{% for t in tools %}{{ t.function.name }}\n{% endfor %}</s>\n{% endif %}"
         "{% for m in messages %}<|{{ m.role }}|>\n{% if m.tool_calls %}{% for c in m.tool_calls %}<call>"
         "{{ c.function.name }}</call>{% endfor %}{% else %}{{ m.content }}{% endif %}</s>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def space_tokenizer(template: str | None = PLAIN) -> PreTrainedTokenizerFast:
    """Word-level, each word with the whitespace in front of it (``' blue.'`` ≠ ``'blue.'``), no BOS."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^\s]+|\s+"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    fast.chat_template = template
    return fast


def ids(tok, *tokens: str) -> list[int]:
    out = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in out or "<unk>" in tokens
    return out


def prep(tmp_jsonl, tmp_path, rows, tok, **kw):
    path = tmp_jsonl(rows)
    cfg = PrefConfig(output_dir=str(tmp_path / "out"), **kw)
    return prepare_dataset(load_rows(str(path)), tok, cfg, source=str(path))


USER = [{"role": "user", "content": "hi"}]
YES, NO = [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}]
PROMPT_IDS = ["<|user|>", "\n", "hi", "</s>", "\n", "<|assistant|>", "\n"]


# --- implicit prompt -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chosen, rejected, prompt", [
    ("The sky is blue.", "The sky is green.", "The sky is"),
    ("The sky is blue", "The sky is black", "The sky is"),  # the shared "bl" stays in the responses
    ("a b\n\nc", "a b\n\nd", "a b"),  # a run of whitespace goes to the responses whole
    ("a b \n c", "a b \n d", "a b"),
    ("abc", "abd", ""),  # no shared word: no prompt (the pair is skipped)
    ("\n\nHuman: hi\n\nAssistant: yes", "\n\nHuman: hi\n\nAssistant: no", "\n\nHuman: hi\n\nAssistant:"),
])
def test_implicit_prompt_split_leaves_the_whitespace_to_the_responses(chosen, rejected, prompt):
    assert chosen[: split_implicit_prompt(chosen, rejected)] == prompt


def test_implicit_prompt_tokens_as_trl_splits_them(tmp_jsonl, tmp_path):
    tok = space_tokenizer()
    ds, _ = prep(tmp_jsonl, tmp_path, [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                       {"chosen": "\n\nHuman: hi\n\nAssistant: yes",
                                        "rejected": "\n\nHuman: hi\n\nAssistant: no"}], tok)
    assert ds[0]["prompt_ids"] == ids(tok, "The", " sky", " is")
    assert ds[0]["chosen_ids"] == ids(tok, " blue.", "</s>")
    assert ds[0]["rejected_ids"] == ids(tok, " green.", "</s>")
    # HH-RLHF transcripts: the turn marker ends the prompt, the space after it starts the response
    assert ds[1]["prompt_ids"] == ids(tok, "\n\n", "Human:", " hi", "\n\n", "Assistant:")
    assert ds[1]["chosen_ids"] == ids(tok, " yes", "</s>")
    assert ds[1]["rejected_ids"] == ids(tok, " no", "</s>")


# --- chat templates --------------------------------------------------------------------------------------------
def test_chat_template_kwargs_reach_the_template_for_prompt_and_responses(tmp_jsonl, tmp_path):
    tok = space_tokenizer(QWEN3)
    rows = [{"prompt": USER, "chosen": YES, "rejected": NO, "chat_template_kwargs": {"enable_thinking": False}},
            {"prompt": USER, "chosen": YES, "rejected": NO, "chat_template_kwargs": None},
            {"prompt": USER, "chosen": YES, "rejected": NO, "chat_template_kwargs": {"enable_thinking": True}}]
    ds, _ = prep(tmp_jsonl, tmp_path, rows, tok)
    think = ["<think>", "\n\n", "</think>", "\n\n"]
    # enable_thinking=false: the generation prompt holds the empty thought block, the response does not
    assert ds[0]["prompt_ids"] == ids(tok, *PROMPT_IDS, *think)
    assert ds[0]["chosen_ids"] == ids(tok, "yes", "</s>")
    assert ds[0]["rejected_ids"] == ids(tok, "no", "</s>")
    # otherwise the response starts with it, as the model writes it
    for row in (ds[1], ds[2]):
        assert row["prompt_ids"] == ids(tok, *PROMPT_IDS)
        assert row["chosen_ids"] == ids(tok, *think, "yes", "</s>")


def test_generation_prompt_that_the_conversation_does_not_render_is_cut_as_trl_cuts(tmp_jsonl, tmp_path, caplog):
    tok = space_tokenizer(GEMMA)
    rows = [{"prompt": USER, "chosen": YES, "rejected": NO},
            # both responses start like "<think>": the cut moves back out of that token, not into it
            {"prompt": USER, "chosen": [{"role": "assistant", "content": "<thinker"}],
             "rejected": [{"role": "assistant", "content": "<thinking"}]}]
    with caplog.at_level(logging.WARNING, logger="prefkit"):
        ds, rep = prep(tmp_jsonl, tmp_path, rows, tok)
    assert rep.summary() == "2 pairs, none skipped"
    for row in ds:
        assert row["prompt_ids"] == ids(tok, *PROMPT_IDS)
    assert ds[0]["chosen_ids"] == ids(tok, "yes", "</s>")
    assert ds[0]["rejected_ids"] == ids(tok, "no", "</s>")
    assert ds[1]["chosen_ids"] == ids(tok, "<thinker", "</s>")
    assert ds[1]["rejected_ids"] == ids(tok, "<thinking", "</s>")
    assert "in 2 row(s) (e.g. row 1)" in caplog.text and repr("<think>\n\n</think>\n\n") in caplog.text


def test_template_that_renders_the_prompt_messages_otherwise_cannot_be_split(tmp_jsonl, tmp_path):
    tok = space_tokenizer("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% if add_generation_prompt %}"
                          " hi{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(DataError, match=r"row 1, field 'chosen': the chat template renders the prompt's messages "
                                        r"differently .* \(from ' hi</s>"):
        prep(tmp_jsonl, tmp_path, [{"prompt": USER, "chosen": YES, "rejected": NO}], tok)


# --- tools -----------------------------------------------------------------------------------------------------
ADD = {"type": "function", "function": {"name": "add", "description": "a + b",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
RESULT = {"role": "tool", "content": "3"}
SYSTEM_IDS = ["<|system|>", "\n", "add", "\n", "</s>", "\n"]
CALL_IDS = ["<call>", "add", "</call>", "</s>", "\n", "<|tool|>", "\n", "3", "</s>", "\n"]


@pytest.mark.parametrize("tools", [[ADD], json.dumps([ADD])], ids=["schemas", "json-string"])
def test_tool_calls_and_tools_render_through_the_template(tmp_jsonl, tmp_path, tools):
    tok = space_tokenizer(TOOLS)
    # implicit prompt: the shared call and its result are prompt, the final answers the responses
    rows = [{"chosen": USER + [CALL, RESULT] + YES, "rejected": USER + [CALL, RESULT] + NO, "tools": tools}]
    ds, _ = prep(tmp_jsonl, tmp_path, rows, tok)
    assert ds[0]["prompt_ids"] == ids(tok, *SYSTEM_IDS, *PROMPT_IDS, *CALL_IDS, "<|assistant|>", "\n")
    assert ds[0]["chosen_ids"] == ids(tok, "yes", "</s>")
    assert ds[0]["rejected_ids"] == ids(tok, "no", "</s>")
    # explicit prompt: the response's every turn is scored, up to its last EOS
    rows = [{"prompt": USER, "chosen": [CALL, RESULT] + YES, "rejected": NO, "tools": tools}]
    ds, _ = prep(tmp_jsonl, tmp_path, rows, tok)
    assert ds[0]["prompt_ids"] == ids(tok, *SYSTEM_IDS, *PROMPT_IDS)
    assert ds[0]["chosen_ids"] == ids(tok, *CALL_IDS, "<|assistant|>", "\n", "yes", "</s>")
    assert ds[0]["rejected_ids"] == ids(tok, "no", "</s>")


@pytest.mark.parametrize("extra, match", [
    ({"chat_template_kwargs": "loud"}, "row 1, field 'chat_template_kwargs': expected an object of keyword arguments"),
    ({"chat_template_kwargs": {"add_generation_prompt": True}},
     "field 'chat_template_kwargs': 'add_generation_prompt' is set by prefkit"),
    ({"tools": "[{not json"}, "row 1, field 'tools': not valid JSON"),
    ({"tools": 3}, "row 1, field 'tools': expected a list of JSON-schema objects"),
    ({"tools": ["add"]}, "field 'tools': expected a list of JSON-schema objects"),
])
def test_bad_template_arguments_name_row_and_field(tmp_jsonl, tmp_path, extra, match):
    with pytest.raises(DataError, match=match) as e:
        prep(tmp_jsonl, tmp_path, [{"prompt": USER, "chosen": YES, "rejected": NO, **extra}], space_tokenizer())
    assert "data.jsonl" in str(e.value)


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "tools": [ADD]}],
     "field 'tools': only conversational rows are rendered with a chat template"),
    ([{"prompt": USER, "chosen": [{"role": "assistant", "content": None}], "rejected": NO}],
     "field 'chosen': message 0 content is not a string"),
    ([{"prompt": USER, "chosen": [{"role": "assistant", "content": None, "tool_calls": "add"}], "rejected": NO}],
     "field 'chosen': message 0 tool_calls is not a list"),
    ([{"prompt": USER, "chosen": [{"role": "assistant", "tool_calls": [{"name": "add"}]}], "rejected": NO}],
     "field 'chosen': the chat template cannot render this row .*no attribute 'function'"),
])
def test_bad_tool_rows_name_row_and_field(tmp_jsonl, tmp_path, rows, match):
    tok = space_tokenizer(TOOLS)
    with pytest.raises(DataError, match=match):
        prep(tmp_jsonl, tmp_path, rows, tok)


# --- TRL's reference columns -----------------------------------------------------------------------------------
def test_per_response_reference_columns_are_carried_and_collated(tmp_jsonl, tmp_path):
    from prefkit.data import PairCollator

    tok = space_tokenizer()
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green.", "ref_chosen_logps": -1.5,
             "ref_rejected_logps": -2}]
    ds, _ = prep(tmp_jsonl, tmp_path, rows, tok)
    assert ds[0]["ref_chosen_logps"] == -1.5 and ds[0]["ref_rejected_logps"] == -2.0
    batch = PairCollator(pad_token_id=tok.pad_token_id)([ds[0]])
    # one value per response lies on its first token, so that any whole-response sum is exact
    assert batch.ref_chosen.tolist() == [[-1.5, 0.0]] and batch.ref_rejected.tolist() == [[-2.0, 0.0]]


@pytest.mark.parametrize("extra, match", [
    ({"ref_chosen_logps": -1.0}, "field 'ref_rejected_logps': 'ref_chosen_logps' without 'ref_rejected_logps'"),
    ({"ref_chosen_logps": [-1.0, -0.5], "ref_rejected_logps": [-1.0]},
     "row 1, field 'ref_chosen_logps': per-token reference log-probs in raw rows"),
    ({"ref_chosen_logps": 0.5, "ref_rejected_logps": -1.0}, "row 1, field 'ref_chosen_logps': expected the "
                                                            "reference's log-probability .* got 0.5"),
    ({"ref_chosen_logps": -1.0, "ref_rejected_logps": "x"}, "field 'ref_rejected_logps'.* got \"x\""),
])
def test_bad_reference_columns_name_row_and_field(tmp_jsonl, tmp_path, extra, match):
    with pytest.raises(DataError, match=match):
        prep(tmp_jsonl, tmp_path, [{"prompt": "The", "chosen": " sky", "rejected": " is", **extra}],
             space_tokenizer())
