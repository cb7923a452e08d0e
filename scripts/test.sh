#!/usr/bin/env bash
# One command from a fresh machine to the test suite: set up (training + serving envs, chromium),
# then run the default (fast) suite. Extra arguments go to pytest, e.g. `-m slow` for the slow ones.
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
exec .venv/bin/python -m pytest -q -p no:randomly --durations=25 "$@"
