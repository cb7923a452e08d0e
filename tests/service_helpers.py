"""Real services for the team-setup tests: a PostgreSQL server and an MLflow server.

PostgreSQL is Debian's (scripts/setup_postgres.sh installs it): initdb in a fresh temporary data
dir, the server on a free loopback port, run as the unprivileged `postgres` user when the tests
run as root (PostgreSQL refuses to run as root), stopped and deleted afterwards.
The MLflow server is `mlflow server` from .venv-mlflow (scripts/setup_mlflow_env.sh).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

from conftest import ROOT, free_port, wait_for_http


def _pg_bin() -> str:
  found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                 key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
  assert found, "needs Debian's PostgreSQL server: bash scripts/setup_postgres.sh"
  return os.path.dirname(found[-1])


class Postgres:
  """One throwaway PostgreSQL cluster: .url(db) -> postgresql://postgres@127.0.0.1:PORT/db."""

  def __init__(self):
    self.bin = _pg_bin()
    self.user = "postgres" if os.getuid() == 0 else None  # root: drop to the server's own user
    self.dir = tempfile.mkdtemp(prefix="jaxclf-pg-")  # /tmp: reachable by that user
    self.data, self.log = os.path.join(self.dir, "data"), os.path.join(self.dir, "server.log")
    self.port = free_port()
    if self.user:
      pw = pwd.getpwnam(self.user)
      os.chown(self.dir, pw.pw_uid, pw.pw_gid)

  def _run(self, *cmd: str, timeout: float = 120) -> None:
    argv = (["runuser", "-u", self.user, "--"] if self.user else []) + list(cmd)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}"

  def start(self) -> "Postgres":
    # trust on 127.0.0.1 only (a throwaway cluster); fsync off: nothing here needs to survive
    self._run(f"{self.bin}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
              "--no-sync", "-E", "UTF8")
    opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
            "-c max_connections=200")
    self._run(f"{self.bin}/pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w",
              "-t", "120", "start")
    return self

  def create_database(self, name: str) -> str:
    import psycopg
    with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
      conn.execute(f'CREATE DATABASE "{name}"')
    return self.url(name)

  def url(self, db: str, driver: str = "") -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://postgres@127.0.0.1:{self.port}/{db}"

  def stop(self) -> None:
    try:
      if os.path.exists(os.path.join(self.data, "postmaster.pid")):
        # immediate: no shutdown checkpoint, since the cluster is deleted next.
        self._run(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
    finally:
      shutil.rmtree(self.dir, ignore_errors=True)


def start_mlflow_server(workdir: str, backend_uri: str, artifacts: list[str],
                        env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
  """`mlflow server` on a free loopback port -> (url, process). `artifacts`: the server's
  artefact options, e.g. ["--artifacts-destination", DIR] or ["--default-artifact-root", S3]."""
  exe = os.path.join(ROOT, ".venv-mlflow", "bin", "mlflow")
  assert os.path.exists(exe), "needs the MLflow server env: bash scripts/setup_mlflow_env.sh"
  port = free_port()
  log_path = os.path.join(workdir, "mlflow-server.log")
  with open(log_path, "wb") as log:
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend_uri, *artifacts, "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
  url = f"http://127.0.0.1:{port}"
  wait_for_http(url + "/health", proc, 180, f"mlflow server did not start; see {log_path}")
  return url, proc


def stop(proc: subprocess.Popen) -> None:
  proc.terminate()
  try:
    proc.wait(30)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
