"""Vendor the demo sample: the first 400 HH-RLHF helpful-base test pairs whose transcripts are each
<= 1,500 characters (short pairs keep the CPU demo fast). Deterministic; run from the repo root."""

import gzip
import json
import shutil
from pathlib import Path

SRC = Path("../shared/data/hh-rlhf")
DST = Path("prefkit/resources")
N, MAX_CHARS = 400, 1500

rows = []
with gzip.open(SRC / "helpful-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
    for line in f:
        r = json.loads(line)
        if len(r["chosen"]) <= MAX_CHARS and len(r["rejected"]) <= MAX_CHARS and r["chosen"] != r["rejected"]:
            rows.append({"chosen": r["chosen"], "rejected": r["rejected"]})
        if len(rows) == N:
            break
DST.mkdir(parents=True, exist_ok=True)
with (DST / "hh_rlhf_helpful_base_sample.jsonl").open("w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
shutil.copy(SRC / "LICENSE", DST / "HH_RLHF_LICENSE")
print(f"wrote {len(rows)} pairs")
