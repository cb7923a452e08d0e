#!/usr/bin/env bash
# The search comparison, as one command: TPE + ASHA pruning against random search without
# pruning, the same budget (16 trials each, configs/cnn.py get_sweep "tpe" and "random": a
# 10,000-image Fashion-MNIST subset, 3 epochs per trial). About an hour on 2 cores; rerunning
# resumes whatever is unfinished.
#
#   bash scripts/compare_searches.sh [OUT_DIR]        (default: sweeps/compare)
#
# Writes OUT_DIR/{tpe,random}/summary.md (trials table, best trial by val, its reproduce command),
# compare.html + curves.png (jaxclf runs compare), wall.json, and OUT_DIR/comparison.json with the
# best val accuracy, the trial compute (sum of trial run times) and the wall time of each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-sweeps/compare}"
mkdir -p "$OUT"
for s in tpe random; do
  start=$(date +%s)
  .venv/bin/jaxclf sweep --config configs/cnn.py --sweep "$s" --workdir "$OUT/$s"
  echo "{\"wall_s\": $(( $(date +%s) - start ))}" > "$OUT/$s/wall.json"
  .venv/bin/jaxclf runs compare "$OUT/$s/trials/*" --html "$OUT/$s/compare.html" \
    --png "$OUT/$s/curves.png" > "$OUT/$s/compare.txt"
done
.venv/bin/python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = {}
for s in ("tpe", "random"):
  summary = json.load(open(os.path.join(out, s, "summary.json")))
  rows[s] = {"sampler": summary["sampler"], "pruner": summary["pruner"],
             "counts": summary["counts"], "trial_compute_s": summary["compute_s"],
             "wall_s": json.load(open(os.path.join(out, s, "wall.json")))["wall_s"],
             "best_val_accuracy": (summary["best"] or {}).get("val_accuracy"),
             "best_trial": (summary["best"] or {}).get("trial"),
             "test_of_best_trial_only": (summary["best"] or {}).get("test_of_best_trial_only")}
json.dump(rows, open(os.path.join(out, "comparison.json"), "w"), indent=2)
print(json.dumps(rows, indent=2))
PY
