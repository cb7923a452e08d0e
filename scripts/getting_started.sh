#!/usr/bin/env bash
# The newcomer walkthrough of docs/getting_started.md, step by step, in a fresh clone, each step
# timed; docs/results/getting_started.json (the figures docs/results.md quotes) comes from it:
#   GETTING_STARTED_JSON=docs/results/getting_started.json bash scripts/getting_started.sh
#   bash scripts/getting_started.sh [REPO (default: this checkout)] [DIR (default: a new temp dir)]
# Writes DIR/steps.tsv (step, wall seconds, exit status, command) and prints it. Serves on
# 127.0.0.1:8000 (JAXCLF_PORT to change) for one prediction, then stops the server.
# tests/test_docs.py checks that every command of the page's table is run here.
set -uo pipefail
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
DIR=${2:-$(mktemp -d)}
PORT=${JAXCLF_PORT:-8000}
mkdir -p "$DIR" && cd "$DIR" || exit 1
LOG=$DIR/steps.tsv; : > "$LOG"
step() {  # step N COMMAND: runs COMMAND with bash, appends its wall time, stops on failure
  local n=$1; shift
  local t0; t0=$(date +%s.%N)
  echo "== $n: $*"
  bash -c "$*"; local rc=$?
  printf "%s\t%.1f\t%s\t%s\n" "$n" "$(awk "BEGIN{print $(date +%s.%N) - $t0}")" "$rc" "$*" >> "$LOG"
  [ "$rc" = 0 ] || { echo "getting_started.sh: step $n failed (exit $rc)" >&2; exit "$rc"; }
}
step 1 "git clone $REPO jaxclf"
cd jaxclf || exit 1
step 2 "bash scripts/setup.sh"
step 3 ".venv/bin/jaxclf train --config configs/cnn.py:quick --workdir runs/quick"
step 4 ".venv/bin/jaxclf evaluate --model-path runs/quick --test-data fashion_mnist --out runs/quick/eval"
step 5 ".venv/bin/jaxclf export --run runs/quick --out exports/quick --register fashion"
step 6 ".venv/bin/jaxclf registry promote fashion 1 --stage production --reason \"first model\""
t0=$(date +%s.%N)
.venv/bin/jaxclf serve --model-path registry:fashion@production --port $PORT > "$DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
until curl -sf "localhost:$PORT/readyz" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { echo "getting_started.sh: serve exited" >&2; cat "$DIR/serve.log"; exit 1; }
  sleep 0.2
done
printf "7\t%.1f\t0\t%s\n" "$(awk "BEGIN{print $(date +%s.%N) - $t0}")" \
  ".venv/bin/jaxclf serve --model-path registry:fashion@production --port $PORT (until /readyz answers)" >> "$LOG"
.venv/bin/python -c "
from PIL import Image; from jaxclf.data.sources import fashion_mnist
x, y = fashion_mnist.load_arrays()['test']; Image.fromarray(x[0, ..., 0]).save('image.png')
print(fashion_mnist.CLASS_NAMES[y[0]])"
step 8 "curl -sS -F file=@image.png localhost:$PORT/v1/predict"
echo
cat "$LOG"
# The same table as JSON for docs/results/ (GETTING_STARTED_JSON=path), with the commit, date and
# CPU it ran on, and the clone and work folders written as <repo> and <dir>.
if [ -n "${GETTING_STARTED_JSON:-}" ]; then
  python3 - "$LOG" "$GETTING_STARTED_JSON" "$REPO" "$DIR" <<'PY'
import json, os, sys
log, out, repo, work = sys.argv[1:5]
sys.path.insert(0, os.path.join(repo, "bench"))
from _common import provenance  # noqa: E402
steps = []
for line in open(log):
  n, wall, rc, cmd = line.rstrip("\n").split("\t", 3)
  steps.append({"step": n, "wall_s": float(wall), "exit": int(rc),
                "command": cmd.replace(repo, "<repo>").replace(work, "<dir>")})
result = {"steps": steps, "total_s": round(sum(s["wall_s"] for s in steps), 1),
          "provenance": {**provenance(), "command": "bash scripts/getting_started.sh"}}
with open(out, "w") as f:
  json.dump(result, f, indent=2)
print(f"wrote {out}")
PY
fi
