#!/usr/bin/env bash
# Builds .venv-mlflow: the MLflow tracking server (`mlflow server`), apart from .venv because the
# full mlflow package pins pyarrow<26 while the training lock has pyarrow 26. Training talks to it
# over HTTP through mlflow-skinny (in .venv).
#
#   scripts/setup_mlflow_env.sh [VENV_DIR]        (default: <repo>/.venv-mlflow; idempotent)
#   .venv-mlflow/bin/mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlruns.db
# The team setup (docs/mlflow.md) runs it on PostgreSQL (psycopg) with an S3 artefact root (boto3);
# the check below imports both, so a venv without them is never stamped as done.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-mlflow}"
bash "$REPO/scripts/pinned_venv.sh" "$VENV" "$REPO/requirements/mlflow-server.txt" \
  "$VENV/bin/python" -c "import mlflow, psycopg, boto3; print('mlflow', mlflow.__version__)"
echo "mlflow env: $VENV ($("$VENV/bin/mlflow" --version))"
