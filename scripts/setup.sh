#!/usr/bin/env bash
# Sets up everything jaxclf needs on a fresh Debian/Ubuntu machine (Python 3.11):
#   - Fashion-MNIST from Debian (dataset-fashion-mnist), when apt is available and we are root;
#     otherwise the loader downloads and sha256-verifies the official files on first use;
#   - .venv/ at the repo root: the training/evaluation/export environment (numpy 2), exact pins
#     from requirements/lock.txt, and jaxclf itself (editable), with its oneDNN convolution
#     extension (jaxclf/ops/onednn_*.cc -> _onednn_conv*.so: conv, BatchNorm, max pool; built by setup.py against the
#     onednn-*-cpu-gomp wheels; setup fails if it does not build where g++ is present, and
#     without a compiler jaxclf falls back to XLA's conv);
#   - with --serving: .venv-serve/, Triton's environment (numpy<2), via scripts/setup_serving_env.sh;
#   - with --bench: torch 2.13.0 CPU in .venv, for the side-by-side baselines in bench/ only.
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVING=0; BENCH=0; TESTDEPS=0
for a in "$@"; do
  case "$a" in
    --serving) SERVING=1 ;;
    --bench) BENCH=1 ;;
    --test) TESTDEPS=1 ;;
    *) echo "setup.sh: unknown option $a (use --serving, --bench, --test)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

APT_PKGS="dataset-fashion-mnist"
[ "$TESTDEPS" = 1 ] && APT_PKGS="$APT_PKGS chromium"
[ "$BENCH" = 1 ] && APT_PKGS="$APT_PKGS wrk"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "== apt-get install$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# lock.txt is the whole resolved set (the per-area files document why each piece is there).
REQS="-r requirements/lock.txt"
[ "$BENCH" = 1 ] && REQS="$REQS -r requirements/bench.txt"
# The stamp covers the extension's sources too, so a changed .cc is rebuilt on rerunning setup.
stamp=".venv/.jaxclf-reqs-$(cat requirements/*.txt pyproject.toml setup.py jaxclf/ops/onednn_*.cc jaxclf/ops/onednn_common.h | sha256sum | cut -c1-16)-$BENCH"
if [ ! -f "$stamp" ]; then
  echo "== pip install (pinned)"
  # shellcheck disable=SC2086
  $PIP install -q $REQS 2>&1 | grep -v "^WARNING: Location" | grep -v "^ *$" || true
  [ "$BENCH" = 1 ] && $PIP install -q --no-deps -r requirements/bench-nodeps.txt
  # --no-build-isolation: setup.py builds the extension against this venv's jaxlib and oneDNN.
  $PIP install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import jax, flax, grain, orbax.checkpoint, jaxclf" || { echo "setup.sh: install failed" >&2; exit 1; }
  # With a C++ compiler the extension must build and load: a failure is a broken install (the
  # tests and the fast train step need it), not a fallback. Checked with JAXCLF_ONEDNN unset, so a
  # caller's opt-out does not hide a broken build. Without g++ jaxclf uses XLA's conv.
  onednn_error=$(env -u JAXCLF_ONEDNN .venv/bin/python -c "from jaxclf.ops import onednn as o; print('' if o.available() else o.load_error())")
  if [ -z "$onednn_error" ]; then
    echo "== oneDNN conv: built"
  elif command -v g++ >/dev/null; then
    echo "setup.sh: the oneDNN extension did not build/load although g++ is present: $onednn_error" >&2
    exit 1
  else
    echo "== oneDNN conv: NOT available (no g++: $onednn_error), using XLA conv"
  fi
  touch "$stamp"
fi
if [ "$SERVING" = 1 ]; then
  bash scripts/setup_serving_env.sh
fi
echo "== ready: $(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.devices())')"
