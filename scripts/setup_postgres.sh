#!/usr/bin/env bash
# Debian's PostgreSQL server, for the team-setup tests (tests/test_postgres.py: an MLflow server
# on PostgreSQL, Optuna's RDB storage shared by sweep workers). The tests start their own
# throwaway cluster (initdb + pg_ctl from /usr/lib/postgresql/*/bin, on a free loopback port, as
# the unprivileged `postgres` user); nothing here starts or enables a server.
#
#   bash scripts/setup_postgres.sh          (idempotent: does nothing when initdb is there)
#
# The Python side is psycopg 3's binary wheel, in requirements/lock.txt (and .venv-mlflow's
# requirements/mlflow-server.txt): no libpq-dev or compiler needed.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && id postgres >/dev/null 2>&1; then
  echo "postgresql: $(ls -d /usr/lib/postgresql/*/bin | tail -n1) (already installed)"
  exit 0
fi
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
$SUDO apt-get update -qq
# policy-rc.d-less containers: the package's postinst may try to start the default cluster;
# that is harmless and not needed (the tests run their own).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
echo "postgresql: $(ls -d /usr/lib/postgresql/*/bin | tail -n1)"
