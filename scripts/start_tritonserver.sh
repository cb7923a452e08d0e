#!/usr/bin/env bash
# Runs the real Triton server (2.51, CPU, python backend) on a model repository, in the foreground.
#
#   scripts/start_tritonserver.sh [MODEL_REPOSITORY] [--http-port 8000] [--grpc-port 8001]
#                                 [--metrics-port 8002] [--models m1 m2 ...] [--poll-secs N]
#                                 [--address 127.0.0.1] [--print-command]
#                                 [-- extra tritonserver flags]
#
# Default: explicit model control, loading every model this server can run (NAME_onnx needs the
# onnxruntime backend, which the pytriton build lacks, so it is written for GPU servers and skipped
# here). Promote/rollback then switch versions live through the repository API
# (`jaxclf registry promote ... --model-repository DIR --triton-url localhost:8000`).
# --poll-secs N instead reloads changed models by polling (failed loads do not stop the server).
# Needs the serving venv: scripts/setup_serving_env.sh (or set JAXCLF_SERVING_VENV).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXCLF_SERVING_VENV:-$REPO/.venv-serve}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "serving venv $VENV not found: run scripts/setup_serving_env.sh" >&2
  exit 2
fi
MODEL_REPO="model_repository"
if [[ $# -gt 0 && "$1" != -* ]]; then MODEL_REPO="$1"; shift; fi
MODEL_REPO="$(realpath -m "$MODEL_REPO")"
exec "$VENV/bin/python" -m jaxclf.export.triton serve "$MODEL_REPO" --venv "$VENV" "$@"
