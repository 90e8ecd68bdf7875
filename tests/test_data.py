"""Data stage: formats, token-exact boundaries, BOS/EOS, truncation, collation, loading, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset

from prefkit.config import PrefConfig
from prefkit.data import PairCollator, bundled_sample_path, load_rows, prepare_dataset, split_train_eval
from prefkit.data.formats import _common_prefix
from prefkit.errors import DataError
from tests.conftest import make_tokenizer


def cfg(tmp_path, **kw) -> PrefConfig:
    return PrefConfig(output_dir=str(tmp_path / "out"), **kw)


def prep(tmp_jsonl, tmp_path, rows, tok=None, **kw):
    tok = tok or make_tokenizer()
    path = tmp_jsonl(rows)
    return prepare_dataset(load_rows(str(path)), tok, cfg(tmp_path, **kw), source=str(path))


def decode(tok, ids):
    return tok.decode(ids)


def test_standard_format_boundary_bos_eos(tmp_jsonl, tmp_path):
    tok = make_tokenizer()
    ds, rep = prep(tmp_jsonl, tmp_path, [{"prompt": "the cat", "chosen": "sat on", "rejected": "ran home"}], tok)
    row = ds[0]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert row["prompt_ids"] == [bos] + tok("the cat", add_special_tokens=False).input_ids
    assert row["chosen_ids"] == tok("sat on", add_special_tokens=False).input_ids + [eos]
    assert row["rejected_ids"][-1] == eos and row["row_id"] == 1
    assert rep.summary() == "1 pairs, none skipped"


def test_bos_not_doubled(tmp_jsonl, tmp_path):
    tok = make_tokenizer()
    ds, _ = prep(tmp_jsonl, tmp_path, [{"prompt": "<s> the cat", "chosen": "sat", "rejected": "ran"}], tok)
    assert ds[0]["prompt_ids"].count(tok.bos_token_id) == 1


def test_implicit_prompt_hh_transcripts(tmp_jsonl, tmp_path):
    tok = make_tokenizer()
    chosen = "\n\nHuman: what is it ?\n\nAssistant: a cat .\n\nHuman: big ?\n\nAssistant: yes big"
    rejected = "\n\nHuman: what is it ?\n\nAssistant: a cat .\n\nHuman: big ?\n\nAssistant: no"
    ds, _ = prep(tmp_jsonl, tmp_path, [{"chosen": chosen, "rejected": rejected}], tok)
    row = ds[0]
    assert row["prompt_ids"] == tok(chosen[: chosen.rfind("Assistant:") + 10]).input_ids
    assert decode(tok, row["chosen_ids"]) == "yes big </s>"
    assert decode(tok, row["rejected_ids"]) == "no </s>"


@pytest.mark.parametrize("a, b, n", [("", "", 0), ("abc", "", 0), ("abc", "abd", 2), ("abc", "abc", 3),
                                     ("abc", "abcde", 3), ("xbc", "abc", 0), ("a b\nc d", "a b\nc e", 6)])
def test_common_prefix_length(a, b, n):
    assert _common_prefix(a, b) == n == _common_prefix(b, a)


def test_conversational_explicit_and_implicit(tmp_jsonl, tmp_path):
    tok = make_tokenizer()
    user = [{"role": "user", "content": "what is 2 + 2 ?"}]
    good, bad = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    ds, _ = prep(tmp_jsonl, tmp_path, [{"prompt": user, "chosen": good, "rejected": bad}], tok)
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    row = ds[0]
    assert row["prompt_ids"][1:] == tok(prompt_text, add_special_tokens=False).input_ids
    full = tok.apply_chat_template(user + good, tokenize=False)
    assert decode(tok, row["prompt_ids"] + row["chosen_ids"]) == decode(tok, tok(full).input_ids) + " </s>"
    ds2, _ = prep(tmp_jsonl, tmp_path, [{"chosen": user + good, "rejected": user + bad}], tok)
    assert ds2[0]["prompt_ids"] == row["prompt_ids"] and ds2[0]["chosen_ids"] == row["chosen_ids"]


def test_truncation_rules(tmp_jsonl, tmp_path):
    tok = make_tokenizer()
    rows = [{"prompt": "1 2 3 4 5 6", "chosen": "a b c d e f", "rejected": "red"}]
    ds, _ = prep(tmp_jsonl, tmp_path, rows, tok, max_length=8, max_prompt_length=4)
    row = ds[0]
    assert decode(tok, row["prompt_ids"]) == "<s> 4 5 6"  # keep_end: BOS + the last 3 of BOS 1 2 3 4 5 6
    assert len(row["prompt_ids"]) == 4 and len(row["chosen_ids"]) == 4  # response keeps its start, loses EOS
    assert tok.eos_token_id not in row["chosen_ids"]
    ds2, _ = prep(tmp_jsonl, tmp_path, rows, tok, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert decode(tok, ds2[0]["prompt_ids"]) == "<s> 1 2 3"
    no_bos = make_tokenizer(bos=False)
    ds4, _ = prep(tmp_jsonl, tmp_path, rows, no_bos, max_length=8, max_prompt_length=4)
    assert decode(no_bos, ds4[0]["prompt_ids"]) == "3 4 5 6"
    ds3, rep = prep(tmp_jsonl, tmp_path, rows + [{"prompt": "a", "chosen": "b", "rejected": "c"}], tok, max_length=6)
    assert len(ds3) == 1 and rep.skipped["prompt longer than max_length"] == 1


def test_skips_are_counted_by_reason(tmp_jsonl, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "", "rejected": "c"},
            {"prompt": "a", "chosen": "b", "rejected": "b"}, {"prompt": " ", "chosen": "b", "rejected": "c"}]
    ds, rep = prep(tmp_jsonl, tmp_path, rows)
    assert len(ds) == 1 and rep.total == 4
    assert rep.skipped == {"empty chosen": 1, "chosen identical to rejected": 1, "empty prompt": 1}
    assert "row 3" in rep.summary()


def test_chunked_tokenization_keeps_every_row_in_order(tmp_jsonl, tmp_path, monkeypatch):
    # 4 texts per tokenizer call over 10 rows: two full chunks and a partial one
    monkeypatch.setattr("prefkit.data.tokenize.ENCODE_CHUNK", 4)
    tok = make_tokenizer()
    words = "the cat sat on a mat dog ran home big".split()
    rows = [{"prompt": " ".join(words[: i + 1]), "chosen": words[i], "rejected": words[i] + " red blue"}
            for i in range(10)]
    ds, rep = prep(tmp_jsonl, tmp_path, rows, tok)
    assert len(ds) == 10 and rep.total == 10
    for row, want in zip(ds, rows):
        assert decode(tok, row["prompt_ids"]) == "<s> " + want["prompt"]
        assert decode(tok, row["chosen_ids"]) == want["chosen"] + " </s>"
        assert decode(tok, row["rejected_ids"]) == want["rejected"] + " </s>"


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "a", "chosen": "b"}], r"missing field\(s\) 'rejected'.*columns found"),
    ([{"prompt": "a", "chosen": "b", "rejectd": "c"}], "'rejectd' → rename to 'rejected'"),
    ([{"prompt": "a", "chosen": None, "rejected": "c"}], "row 1, field 'chosen': expected a string, got null"),
    ([{"prompt": "a", "chosen": 3, "rejected": "c"}], "field 'chosen': expected a string, got int"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"},
      {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
       "rejected": [{"role": "assistant", "content": "c"}]}], "row 2.*mixed formats"),
    ([{"prompt": [{"role": "wizard", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
       "rejected": [{"role": "assistant", "content": "c"}]}], "unknown role 'wizard'"),
    ([{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
       "rejected": [{"role": "assistant", "content": "c"}]}], "field 'chosen': no assistant turn"),
    ([{"prompt": "a", "chosen": "b", "rejected": "b"}], "every pair was skipped"),
])
def test_bad_rows_give_one_clear_message(tmp_jsonl, tmp_path, rows, match):
    with pytest.raises(DataError, match=match) as e:
        prep(tmp_jsonl, tmp_path, rows)
    assert "data.jsonl" in str(e.value)


def test_conversational_without_chat_template(tmp_jsonl, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
             "rejected": [{"role": "assistant", "content": "c"}]}]
    with pytest.raises(DataError, match="chat template"):
        prep(tmp_jsonl, tmp_path, rows, make_tokenizer(chat_template=False))


def test_malformed_json_line_and_invalid_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", chosen}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_rows(str(p))
    q = tmp_path / "bin.jsonl"
    q.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: invalid UTF-8"):
        load_rows(str(q))


def test_missing_path_empty_dataset_and_dir_without_dataset(tmp_path, tmp_jsonl):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="without a dataset"):
        load_rows(str(tmp_path))
    empty = tmp_jsonl([], "empty.jsonl")
    with pytest.raises(DataError):
        prepare_dataset(load_rows(str(empty)), make_tokenizer(), cfg(tmp_path), source=str(empty))


def test_every_file_type_loads(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "dog", "rejected": "cat"}]
    ds = Dataset.from_list(rows)
    ds.to_json(str(tmp_path / "d.json"), lines=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "d.parquet", "d.csv", "d.jsonl.gz", "saved"):
        loaded = load_rows(str(tmp_path / name))
        assert len(loaded) == 2 and loaded[1]["chosen"] == "dog", name


def test_collator_layout():
    feats = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2], "row_id": 3},
             {"prompt_ids": [1], "chosen_ids": [9, 2], "rejected_ids": [2], "row_id": 4}]
    b = PairCollator(pad_token_id=0, eos_token_id=2)(feats)
    assert b.input_ids.tolist() == [[1, 5, 6, 2, 0], [1, 9, 2, 0, 0], [1, 5, 7, 8, 2], [1, 2, 0, 0, 0]]
    assert b.response_start.tolist() == [2, 1, 2, 1] and b.response_len.tolist() == [2, 2, 3, 1]
    assert b.attention_mask.sum(1).tolist() == [4, 3, 5, 2] and b.row_ids.tolist() == [3, 4]
    eos = PairCollator(pad_token_id=0, eos_token_id=2, static_eos_padding=True)(feats)
    assert eos.input_ids[0].tolist() == [1, 5, 6, 2, 2] and eos.response_len.tolist() == [3, 2, 3, 2]


def test_split_and_bundled_sample(tmp_path):
    rows = load_rows(bundled_sample_path())
    tok = make_tokenizer()
    ds, rep = prepare_dataset(rows, tok, cfg(tmp_path, max_length=4096), source="sample")
    assert len(ds) >= 300 and (Path(bundled_sample_path()).parent / "HH_RLHF_LICENSE").is_file()
    train, held = split_train_eval(ds, 64, seed=0)
    assert len(held) == 64 and len(train) == len(ds) - 64
    again, held2 = split_train_eval(ds, 64, seed=0)
    assert held["row_id"] == held2["row_id"]


def test_token_weights_cover_the_whole_response_or_the_response_as_cut(tmp_jsonl, tmp_path):
    """`prefkit critical-tokens` scores the response as --max_length cuts it, so its lists are that long; a list
    for the whole response is cut by training itself; any other length names the row and field."""
    tok = make_tokenizer()
    prompt, chosen, rejected = "the cat", "sat on the mat and then it ran home", "ran"
    n_prompt = 1 + len(tok(prompt, add_special_tokens=False).input_ids)  # BOS first
    full = len(tok(chosen, add_special_tokens=False).input_ids) + 1  # EOS last
    room = 4  # max_length − prompt: the chosen response is cut to 4 tokens (it loses its EOS)
    assert full > room
    kw = {"max_length": n_prompt + room, "use_token_weights": True}
    for given in ([0.5] * room, [0.5] * full):
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_token_weights": given,
               "rejected_token_weights": [0.25, 0.75]}
        ds, _ = prep(tmp_jsonl, tmp_path, [row], tok, **kw)
        assert ds[0]["chosen_token_weights"] == [0.5] * room and ds[0]["rejected_token_weights"] == [0.25, 0.75]
    bad = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_token_weights": [0.5] * (room + 1),
           "rejected_token_weights": [0.25, 0.75]}
    with pytest.raises(DataError) as e:
        prep(tmp_jsonl, tmp_path, [bad], tok, **kw)
    assert "row 1" in str(e.value) and "chosen_token_weights" in str(e.value)
    assert f"expected {full} weights" in str(e.value) and f"or {room}" in str(e.value)
