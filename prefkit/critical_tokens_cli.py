"""`prefkit critical-tokens`: write cADPO token weights as dataset fields.

Scores every response token with a positive and a negative model (fine-tuned on correct resp. incorrect
solutions) and writes the input rows plus ``chosen_token_weights`` / ``rejected_token_weights``, one weight
per response token of the *policy tokenizer* under the same truncation options as training, so training
with ``--use_token_weights true`` and the same tokenizer/max_length options reads them back aligned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from prefkit.configfile import parse_config
from prefkit.critical_tokens import critical_token_weights, pair_weights
from prefkit.data import PairCollator, load_rows, prepare_dataset
from prefkit.data.spec import DataSpec
from prefkit.errors import ConfigError
from prefkit.models import load_causal_lm, load_tokenizer, resolve_model_path
from prefkit.runsetup import weight_dtype

if TYPE_CHECKING:
    from prefkit.config import PrefConfig
    from prefkit.data.types import SkipReport


def critical_tokens_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prefkit critical-tokens", description=__doc__.splitlines()[0], epilog=(
        "The data and truncation options of `prefkit train` (--dataset_name, --dataset_split, --max_length, "
        "--max_prompt_length, --truncation_mode, ...) apply as well: see `prefkit train --help`."))
    p.add_argument("--positive_model", required=True, help="model fine-tuned on correct solutions")
    p.add_argument("--negative_model", required=True, help="model fine-tuned on incorrect solutions")
    p.add_argument("--output_file", required=True, help="JSONL to write")
    p.add_argument("--tokenizer", default=None, help="policy tokenizer (default: the positive model's)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--weight_chosen", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="also weight chosen tokens by s_t (default: chosen weights 1)")
    own, rest = p.parse_known_args(argv)
    cfg = parse_config(rest + ["--output_dir", str(Path(own.output_file).parent)])
    n, report = write_token_weights(cfg, own.positive_model, own.negative_model, own.output_file,
                                    tokenizer=own.tokenizer, batch_size=own.batch_size, weight_chosen=own.weight_chosen)
    print(f"wrote {n} rows with token weights to {own.output_file}; {report.summary()}")
    return 0


def write_token_weights(cfg: PrefConfig, positive_model: str, negative_model: str, output_file: str | Path, *,
                        tokenizer: str | None = None, batch_size: int = 8,
                        weight_chosen: bool = False) -> tuple[int, SkipReport]:
    """Write ``cfg.dataset_name``'s rows with cADPO token weights to ``output_file`` (JSONL); the rows written
    and the data report. ``tokenizer``: the policy's (default: the positive model's); ``weight_chosen``: also
    weight chosen tokens by s_t (otherwise chosen weights are 1)."""
    if cfg.dataset_name is None:
        raise ConfigError("--dataset_name: required for critical-tokens")
    tok = load_tokenizer(resolve_model_path(tokenizer or positive_model))
    dtype = weight_dtype(cfg)
    device = torch.device(cfg.device)
    pos = load_causal_lm(resolve_model_path(positive_model), dtype=dtype).to(device).eval()
    neg = load_causal_lm(resolve_model_path(negative_model), dtype=dtype).to(device).eval()
    rows = load_rows(cfg.dataset_name, cfg.dataset_split)
    data = dataclasses.replace(DataSpec.from_config(cfg), use_token_weights=False)  # the input has none yet
    ds, report = prepare_dataset(rows, tok, data, source=cfg.dataset_name)
    by_row = {r["__row__"]: {k: v for k, v in r.items() if k != "__row__"} for r in rows}
    collator = PairCollator(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f, torch.no_grad():
        for start in tqdm(range(0, len(ds), batch_size), desc="critical tokens"):
            feats = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            batch = collator(feats).to(device)
            scores = critical_token_weights(
                pos, neg, batch.input_ids, batch.attention_mask, batch.response_start, batch.response_len
            )
            chosen_w, rejected_w = pair_weights(scores, batch.num_pairs)
            if not weight_chosen:
                chosen_w = torch.ones_like(chosen_w)
            for i, feat in enumerate(feats):
                row = dict(by_row[feat["row_id"]])
                row["chosen_token_weights"] = chosen_w[i, : len(feat["chosen_ids"])].tolist()
                row["rejected_token_weights"] = rejected_w[i, : len(feat["rejected_ids"])].tolist()
                f.write(json.dumps(row) + "\n")
    return len(ds), report
