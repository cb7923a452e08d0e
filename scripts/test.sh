#!/usr/bin/env bash
# One command from a fresh machine to the test suite: set up (training + serving envs, chromium),
# then run the default (fast) suite. Extra arguments go to pytest, e.g. `-m slow` for the slow ones.
# The suite runs on JAXCLF_TEST_WORKERS pytest-xdist workers (default 2), one test file per worker at
# a time (--dist loadfile, see tests/README.md); JAXCLF_TEST_WORKERS=1 runs it serially.
set -euo pipefail
cd "$(dirname "$0")/.."
# --bench: torch CPU, the reference for the weight-conversion parity tests (tests/test_weights_parity.py)
bash scripts/setup.sh --test --serving --bench
bash scripts/setup_mlflow_env.sh  # .venv-mlflow: the MLflow tracking server (tests/test_sweeps.py)
bash scripts/setup_lint_env.sh   # .venv-lint: deploy/CI linters (tests/test_deploy.py)
bash scripts/setup_beam_env.sh   # .venv-beam: Apache Beam ingest (tests/test_beam_ingest.py)
bash scripts/setup_postgres.sh   # Debian's PostgreSQL server (tests/test_postgres.py)
bash scripts/setup_image_envs.sh # .venv-image-*: each Docker image's packages (tests/test_images.py)
echo "[test.sh] setup took ${SECONDS} s; now the tests"
WORKERS="${JAXCLF_TEST_WORKERS:-2}"
case "$WORKERS" in
  ''|*[!0-9]*|0) echo "test.sh: JAXCLF_TEST_WORKERS=$WORKERS: expected a whole number >= 1" >&2; exit 2 ;;
esac
PARALLEL=()
if [ "$WORKERS" -gt 1 ]; then PARALLEL=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder); fi
exec .venv/bin/python -m pytest -q -p no:randomly --durations=25 ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
