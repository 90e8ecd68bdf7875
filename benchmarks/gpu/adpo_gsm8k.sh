#!/usr/bin/env bash
# ADPO Table 2 recipe (docs/gpu.md): on-policy pairs -> DPO and ADPO (adaptive m=256) -> held-out metrics and
# GSM8K test accuracy. Run from the repository root on a GPU machine:
#   bash benchmarks/gpu/adpo_gsm8k.sh
# Environment: MODEL (default meta-llama/Meta-Llama-3-8B-Instruct), K samples per question (default 8; cDPO
# used 64), TEMPERATURE (default 0.5, cDPO's GSM8K value for Llama-3-8B), BACKEND (hf | vllm), GSM8K (folder
# with train.jsonl / test.jsonl: {question, answer}), OUT (default benchmarks/out/gpu/adpo_gsm8k).
set -euo pipefail
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
K=${K:-8}
TEMPERATURE=${TEMPERATURE:-0.5}
BACKEND=${BACKEND:-hf}
GSM8K=${GSM8K:-../shared/data/gsm8k}
OUT=${OUT:-benchmarks/out/gpu/adpo_gsm8k}
CONFIG=benchmarks/gpu/adpo_gsm8k_llama3_8b.yaml
PY=${PYTHON:-python}

# 1. on-policy pairs: K samples per training question from the starting model, scored by the final number
#    against the reference answer (after '####'), one (correct, incorrect) pair per question that has both
$PY -m prefkit pairs --model_name_or_path "$MODEL" --prompts "$GSM8K/train.jsonl" --prompt_field question \
  --reference_field answer --scorer math --num_samples "$K" --temperature "$TEMPERATURE" --pairing best_worst \
  --max_new_tokens 512 --backend "$BACKEND" --output "$OUT/pairs.jsonl"

# 2. train: DPO (response-level feedback) and ADPO (adaptive m=256), same pairs, same seed, same LoRA init
for name in dpo adpo_m256; do
  extra=()
  [ "$name" = dpo ] && extra=(--granularity response)
  $PY -m prefkit train --config "$CONFIG" --model_name_or_path "$MODEL" --dataset_name "$OUT/pairs.jsonl" \
    --output_dir "outputs/gpu/adpo_gsm8k/$name" --overwrite_output_dir true "${extra[@]}"
done

# 3. eval: the before/after implicit-reward table is printed by each run (eval_results.json); GSM8K test
#    accuracy with EleutherAI's lm-evaluation-harness (not a prefkit dependency: pip install lm-eval)
for name in dpo adpo_m256; do
  lm_eval --model hf --model_args "pretrained=$MODEL,peft=outputs/gpu/adpo_gsm8k/$name,dtype=bfloat16" \
    --tasks gsm8k_cot --apply_chat_template --batch_size auto --output_path "outputs/gpu/adpo_gsm8k/$name/lm_eval"
done
