#!/usr/bin/env bash
# Installs the gateway image's environment into a fresh venv: the exact step Dockerfile.serve runs,
# so scripts/setup_image_envs.sh builds the same environment here (.venv-image-serve) and
# tests/test_images.py starts the gateway, both backends, and `jaxclf registry deploy` from it.
#
#   scripts/install_gateway_env.sh VENV_DIR        (run from the source tree's root)
#
# The pins are requirements/gateway-image.txt, a closed set (every dependency pinned): installed
# with --no-deps, then `pip check` proves nothing is missing or out of range. The project's code is
# not installed: the image puts jaxclf/ and serving/ on PYTHONPATH (no jax, no build step).
set -euo pipefail
VENV="${1:?usage: install_gateway_env.sh VENV_DIR}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --no-compile --no-deps -r requirements/gateway-image.txt
"$VPY" -m pip check
# From outside the source tree: the packages the gateway's two backends and the registry need.
(cd / && "$VPY" -c "
import numpy, onnxruntime, PIL, fastapi, uvicorn, s3fs, tritonclient.grpc, tritonclient.http
from tritonclient.grpc import model_config_pb2
print('gateway env ok: numpy', numpy.__version__, '| onnxruntime', onnxruntime.__version__)")
