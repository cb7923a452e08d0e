#!/usr/bin/env bash
# Builds the serving environment .venv-serve (numpy < 2, onnxruntime, Pillow, tritonclient, and the
# tritonserver 2.51 binary bundled in nvidia-pytriton) plus a Triton backend directory for it.
#
#   scripts/setup_serving_env.sh [VENV_DIR]        (default: <repo>/.venv-serve; idempotent)
#
# Why a second venv: Triton's python-backend stub needs numpy < 2, the training venv needs numpy 2.
# The project itself is made importable through a .pth file (not `pip install -e .`), so the
# Triton python models can import jaxclf.data.decode / jaxclf.data.transforms without pulling
# jax into the serving environment: those two modules import only numpy and Pillow.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-serve}"
PY="${PYTHON:-python3.11}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.jaxclf-reqs-$(cat "$REPO/requirements/serving.txt" "$REPO/requirements/serving-api.txt" | sha256sum | cut -c1-16)"
if [[ ! -f "$STAMP" ]]; then
  "$VPY" -m pip install --quiet --upgrade "pip>=24"
  # Everything but nvidia-pytriton, with dependencies, from the pinned list.
  grep -v '^nvidia-pytriton' "$REPO/requirements/serving.txt" > "$VENV/.requirements-deps.txt"
  "$VPY" -m pip install --quiet -r "$VENV/.requirements-deps.txt"
  "$VPY" -m pip install --quiet --no-deps "$(grep '^nvidia-pytriton' "$REPO/requirements/serving.txt")"
  # The REST gateway's own packages, so `jaxclf serve --backend triton` runs here too.
  grep -v test-only "$REPO/requirements/serving-api.txt" > "$VENV/.requirements-api.txt"
  "$VPY" -m pip install --quiet -r "$VENV/.requirements-api.txt"
  touch "$STAMP"
fi

SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$REPO" > "$SITE/jaxclf_repo.pth"

# Backend directory the server is pointed at with --backend-directory: python/ holds the backend
# library, its utils module and the stub built for this interpreter's version.
PYVER="$("$VPY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
PT="$SITE/pytriton/tritonserver"
BACKENDS="$VENV/triton/backends"
mkdir -p "$BACKENDS/python"
cp -f "$PT/backends/python/libtriton_python.so" "$PT/backends/python/triton_python_backend_utils.py" \
  "$BACKENDS/python/"
cp -f "$PT/python_backend_stubs/$PYVER/triton_python_backend_stub" "$BACKENDS/python/"
chmod +x "$BACKENDS/python/triton_python_backend_stub"

# perf_analyzer (from the tritonclient wheel) links libb64.so.0d and libcudart.so.12, which
# nvidia_pytriton.libs carries under hashed names: expose them under their sonames.
LIBS="$VENV/triton/lib"
mkdir -p "$LIBS"
for soname in libb64.so.0d libcudart.so.12; do
  stem="${soname%%.so*}"
  src="$(ls "$SITE/nvidia_pytriton.libs/" | grep "^${stem}[-.]" | head -n1 || true)"
  if [[ -n "$src" ]]; then ln -sf "$SITE/nvidia_pytriton.libs/$src" "$LIBS/$soname"; fi
done

# Smoke check: the imports the Triton python models need, and the server binary runs.
"$VPY" - <<'PY'
import numpy, onnxruntime, PIL, tritonclient.http, tritonclient.grpc
from jaxclf.data import decode, transforms  # via the .pth; must not import jax
import sys
assert numpy.__version__.startswith("1."), numpy.__version__
assert "jax" not in sys.modules, "jaxclf.data.transforms pulled in jax"
print(f"serving env ok: numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"pillow {PIL.__version__}")
PY
echo "serving env: $VENV (backends: $BACKENDS)"
