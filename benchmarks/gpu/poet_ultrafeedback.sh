#!/usr/bin/env bash
# POET recipe (docs/gpu.md): UltraFeedback -> DPO, DPO+POET, SimPO, SimPO+POET (full fine-tuning of
# princeton-nlp/Llama-3-Base-8B-SFT) -> held-out implicit-reward metrics. Generation metrics (AlpacaEval 2,
# Arena-Hard) run outside prefkit on the saved models (docs/gpu.md). Run from the repository root:
#   bash benchmarks/gpu/poet_ultrafeedback.sh
# Environment: ACCELERATE_CONFIG (default examples/accelerate/fsdp2.yaml; set its num_processes to your GPU
# count and gradient_accumulation_steps to 64 / GPUs), OUT (default benchmarks/out/gpu/ultrafeedback).
set -euo pipefail
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-examples/accelerate/fsdp2.yaml}
OUT=${OUT:-benchmarks/out/gpu/ultrafeedback}
PY=${PYTHON:-python}

# 1. data: train_prefs / test_prefs as JSONL without the `prompt` column (chosen/rejected are whole
#    conversations; prefkit takes their shared user turn as the prompt)
$PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from datasets import load_dataset
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for split in ("train_prefs", "test_prefs"):
    if not (out / f"{split}.jsonl").is_file():
        ds = load_dataset("HuggingFaceH4/ultrafeedback_binarized", split=split)
        ds.select_columns(["chosen", "rejected"]).to_json(str(out / f"{split}.jsonl"))
PYEOF

# 2. train the four runs (POET on / off for each objective)
for objective in dpo simpo; do
  for poet in true false; do
    accelerate launch --config_file "$ACCELERATE_CONFIG" -m prefkit train \
      --config "benchmarks/gpu/poet_ultrafeedback_$objective.yaml" --poet "$poet" \
      --output_dir "outputs/gpu/poet_ultrafeedback/${objective}_poet_$poet" --overwrite_output_dir true
  done
done
