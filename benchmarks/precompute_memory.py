"""Peak memory of a Python PrefTrainer run with and without precompute_ref_log_probs (docs/trl.md).

    python benchmarks/precompute_memory.py 0   # reference copy
    python benchmarks/precompute_memory.py 1   # precomputed reference log-probs, no reference module
"""
import json
import resource
import sys

from datasets import load_dataset

from prefkit import PrefConfig, PrefTrainer
from prefkit.data import bundled_sample_path
from prefkit.models import default_model_path, resolve_model_path

pre = sys.argv[1] == "1"
ds = load_dataset("json", data_files=bundled_sample_path(), split="train").select(range(16))
args = PrefConfig(output_dir=f"/tmp/prefkit_precompute_mem{int(pre)}", max_steps=2, per_device_train_batch_size=2, max_length=128,
                  report_to="none", use_cpu=True, dynamics_steps=0, precompute_ref_log_probs=pre,
                  ref_cache_dir="/tmp/prefkit_precompute_refcache", overwrite_output_dir=True, logging_steps=1, seed=0)
t = PrefTrainer(model=resolve_model_path(default_model_path()), args=args, train_dataset=ds)
t.train()
print(json.dumps({"precompute": pre, "ref_model": t.ref_model is not None,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "losses": [r["loss"] for r in t.state.log_history if "loss" in r]}))
