#!/usr/bin/env bash
# GPU check: on a host with an NVIDIA GPU, measures the train step of the default CNN and
# ResNet-18 (step time, img/s, the host->device copy, GPU utilisation sampled every 100 ms by
# nvidia-smi), then the trainer's data-parallel path on a mesh of that GPU (float32, bfloat16,
# float16, gradient accumulation; bench/gpu.py data_parallel), and writes
# ${OUT:-docs/results}/gpu_check.json (+ gpu_util.csv beside it).
#   bash scripts/gpu_check.sh                   # from the repository root or anywhere
#   OUT=/tmp/gpu bash scripts/gpu_check.sh      # results elsewhere
# Needs python3 with jax[cuda12], flax and optax. A host without clu or ml_collections (and no
# package index) can take their wheels from .whl/, which the script installs into /tmp/site:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl clu==0.0.12 ml-collections==1.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUTDIR=${OUT:-docs/results}; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Utilisation sampled every 100 ms while the benchmark runs.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 \
  > "$OUTDIR/gpu_util.csv" 2>/dev/null & SMI=$!
python3 bench/gpu.py --out "$OUTDIR/gpu_check.json" "$@"
kill $SMI 2>/dev/null || true
python3 - "$OUTDIR" <<'PY'
import csv, json, statistics, sys
d = sys.argv[1]
rows = [r for r in csv.reader(open(f"{d}/gpu_util.csv")) if len(r) == 3]
util = [float(r[1]) for r in rows]
res = json.load(open(f"{d}/gpu_check.json"))
res["utilisation_pct"] = {"mean": statistics.mean(util) if util else None,
                          "max": max(util) if util else None, "samples": len(util)}
json.dump(res, open(f"{d}/gpu_check.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
