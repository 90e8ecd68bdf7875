#!/usr/bin/env bash
# First contact with a CUDA GPU (docs/gpu.md, "Smoke test"): a bf16 training step, the layouts equal, ADPO / POET /
# RC train, TRL DPOTrainer vs prefkit (pairs/s and peak CUDA memory, interleaved, 2 runs each) on models shaped like
# SmolLM2-135M and a 1B Llama with random weights, and a `prefkit pairs` pass. Nothing is downloaded.
#
#   bash benchmarks/gpu/smoke.sh                    # PYTHON=... to pick the interpreter; extra arguments go to smoke.py
#   bash benchmarks/gpu/smoke.sh --dry-run          # tiny sizes on the CPU (what the tests run)
#
# Prints PASS / WARN / FAIL lines; the JSON summary goes to benchmarks/gpu/out/smoke-<time>.json (or --out FILE).
# Exit status 1 when a check failed, 2 when the environment is missing something.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = ["torch", "transformers", "peft", "accelerate", "datasets", "trl", "prefkit"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "prefkit: error: $PYTHON lacks $missing; install them (pip install -e . for prefkit; trl and datasets are" \
         "pure-Python wheels) or set PYTHON to an interpreter that has them" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu/smoke.py "$@"
