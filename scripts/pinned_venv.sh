#!/usr/bin/env bash
# Creates or updates a tool venv from one pinned requirements file (shared by the setup_*_env.sh
# scripts of the tools whose pins clash with requirements/lock.txt).
#
#   scripts/pinned_venv.sh VENV_DIR REQUIREMENTS_FILE [CHECK_COMMAND ...]
#
# Idempotent: a stamp named after the requirements file's sha256 skips pip when nothing changed.
# CHECK_COMMAND runs after an install; the stamp is written only if it succeeds.
set -euo pipefail
VENV="${1:?usage: pinned_venv.sh VENV_DIR REQUIREMENTS_FILE [CHECK_COMMAND ...]}"
REQS="${2:?usage: pinned_venv.sh VENV_DIR REQUIREMENTS_FILE [CHECK_COMMAND ...]}"
shift 2
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.jaxclf-reqs-$(sha256sum "$REQS" | cut -c1-16)"
if [[ ! -f "$STAMP" ]]; then
  echo "== pip install -r $(basename "$REQS") into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install --quiet -r "$REQS" 2>&1 | grep -v "^WARNING: Location" || true
  if [[ $# -gt 0 ]]; then
    "$@" || { echo "pinned_venv.sh: check failed after installing $REQS: $*" >&2; exit 1; }
  fi
  touch "$STAMP"
fi
