#!/usr/bin/env bash
# perf_analyzer (from the tritonclient 2.51.0 wheel in the serving venv) against a running server.
#
#   scripts/perf_analyzer.sh [MODEL] [-u localhost:8000] [-i http|grpc] [--concurrency 1 4 16]
#                            [--images a.png b.jpg ...] [--out results.json]
#
# MODEL defaults to fashion_image (the bytes-in ensemble). The input data file is built from
# --images (default: 32 Fashion-MNIST test images as PNG) with Triton's 4-byte length prefix in
# each b64 BYTES element. Prints JSON: per concurrency, throughput and p50/p90/p95/p99 in ms.
# For a self-contained run (server started for you, in-process baseline beside it) use
# `.venv/bin/python bench/triton_perf.py`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXCLF_SERVING_VENV:-$REPO/.venv-serve}"
[[ -x "$VENV/bin/perf_analyzer" ]] || { echo "no perf_analyzer in $VENV: run scripts/setup_serving_env.sh" >&2; exit 2; }
MODEL="fashion_image"
if [[ $# -gt 0 && "$1" != -* ]]; then MODEL="$1"; shift; fi
URL="localhost:8000"; PROTO="http"; CONC=(1 4 16); IMAGES=(); OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -u|--url) URL="$2"; shift 2 ;;
    -i|--protocol) PROTO="$2"; shift 2 ;;
    --concurrency) shift; CONC=(); while [[ $# -gt 0 && "$1" != -* ]]; do CONC+=("$1"); shift; done ;;
    --images) shift; while [[ $# -gt 0 && "$1" != -* ]]; do IMAGES+=("$(realpath "$1")"); shift; done ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" "$REPO/bench/triton_perf.py" make-data "$WORK/data.json" "${IMAGES[@]}"
# perf_analyzer links libb64.so.0d and libcudart.so.12; setup_serving_env.sh links them into triton/lib.
export LD_LIBRARY_PATH="$VENV/triton/lib:$VENV/lib/python3.11/site-packages/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
CSVS=()
for c in "${CONC[@]}"; do
  "$VENV/bin/perf_analyzer" -m "$MODEL" -u "$URL" -i "$PROTO" -b 1 --concurrency-range "$c:$c" \
    --input-data "$WORK/data.json" -p 3000 -r 6 -s 50 -f "$WORK/c$c.csv" >&2
  CSVS+=("$WORK/c$c.csv")
done
RESULT="$("$VENV/bin/python" "$REPO/bench/triton_perf.py" parse-csv "${CSVS[@]}")"
echo "$RESULT"
if [[ -n "$OUT" ]]; then echo "$RESULT" > "$OUT"; fi
