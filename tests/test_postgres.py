"""The team setup on a real PostgreSQL (Debian's server, started here on a free loopback port):
an MLflow server on PostgreSQL with its artefacts on S3 (moto's server), and Optuna's RDB storage
shared by two sweep workers, one of them killed mid-trial.

The single-machine setups (SQLite MLflow, the journal-file study) are tests/test_sweeps.py.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import psycopg  # requirements/lock.txt (psycopg[binary]): missing, the install is broken
import pytest

from conftest import ROOT
from service_helpers import Postgres, start_mlflow_server, stop
from test_sweeps import TINY  # the tiny config and its sweeps ("lr" here)


@pytest.fixture(scope="module")
def postgres():
  pg = Postgres().start()
  try:
    yield pg
  finally:
    pg.stop()


@pytest.fixture(scope="module")
def mlflow_pg_s3(postgres, s3_server, tmp_path_factory):
  """`mlflow server` on postgresql+psycopg:// with its artefacts proxied to s3://mlflow/."""
  import boto3
  boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
      Bucket="mlflow")
  db = postgres.create_database("mlflow")
  d = tmp_path_factory.mktemp("mlflow-pg")
  url, proc = start_mlflow_server(
      str(d), db.replace("postgresql://", "postgresql+psycopg://"),
      ["--artifacts-destination", "s3://mlflow/artifacts"],
      env={"MLFLOW_S3_ENDPOINT_URL": s3_server})
  try:
    yield {"url": url, "db": db, "s3": s3_server, "dir": d}
  finally:
    stop(proc)


def _fake_export(path) -> str:
  """A minimal export directory (the files and the sha256s that verify_export_dir checks)."""
  os.makedirs(path)
  files = {"model.onnx": b"onnx-bytes", "preprocessing.json": b"{}", "labels.txt": b"a\nb\n"}
  for name, data in files.items():
    (path / name).write_bytes(data)
  meta = {"format": "jaxclf-export", "format_version": 1,
          "model": {"input_name": "image", "output_name": "logits", "onnx": "1.x",
                    "input_shape": [None, 8, 8, 1], "output_shape": [None, 2]},
          "source": {"run_dir": str(path) + "-run", "config": {"name": "pg_test"},
                     "metrics": {"val": {"accuracy": 0.5}}},
          "artifacts": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
  (path / "export.json").write_text(json.dumps(meta))
  return str(path)


def test_mlflow_on_postgres_and_s3_registers_aliases_and_refuses_tampering(
    mlflow_pg_s3, tmp_path, monkeypatch):
  import boto3
  from jaxclf.tracking import model_registry as mr
  monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_pg_s3["url"])
  info = mr.register_export(_fake_export(tmp_path / "export"), "pgmodel", mlflow_pg_s3["url"],
                            registry_version=1)
  assert info["version"] == 1
  assert mr.mirror_stage(mlflow_pg_s3["url"], "pgmodel", "production", 1)["mlflow_version"] == 1
  # the rows are in PostgreSQL, the files in the S3 bucket
  with psycopg.connect(mlflow_pg_s3["db"]) as conn:
    assert conn.execute("SELECT name, version FROM model_versions").fetchall() == [
        ("pgmodel", 1)]
    assert conn.execute("SELECT alias, version FROM registered_model_aliases").fetchall() == [
        ("production", 1)]
  s3 = boto3.client("s3", endpoint_url=mlflow_pg_s3["s3"], region_name="us-east-1")
  keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]]
  onnx_key = next(k for k in keys if k.endswith("/model-v1/model.onnx"))
  assert any(k.endswith("/model-v1/MLmodel") for k in keys)
  local = mr.download_model("models:/pgmodel@production", str(tmp_path / "dl"))
  assert open(os.path.join(local, "model.onnx"), "rb").read() == b"onnx-bytes"
  # a missing alias, then an altered artefact in the bucket: one line each, naming it
  with pytest.raises(mr.MlflowRegistryError) as e:
    mr.download_model("models:/pgmodel@champion", str(tmp_path / "dl"))
  assert "models:/pgmodel@champion: MLflow registered model 'pgmodel' has no alias @champion" \
      in str(e.value) and "\n" not in str(e.value)
  s3.put_object(Bucket="mlflow", Key=onnx_key, Body=b"tampered")
  with pytest.raises(mr.MlflowRegistryError) as e:
    mr.download_model("models:/pgmodel/1", str(tmp_path / "dl"))
  assert "model.onnx: sha256" in str(e.value) and "does not match export.json" in str(e.value)
  assert str(e.value).startswith("models:/pgmodel/1: ") and "\n" not in str(e.value)




def _wait_until(what: str, fn, timeout: float):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    got = fn()
    if got:
      return got
    time.sleep(0.5)
  raise AssertionError(f"no {what} within {timeout:.0f} s")


# Two worker processes training real (tiny) trials, a kill -9 and a resume: over a minute.
@pytest.mark.slow
def test_two_workers_on_postgres_one_killed_mid_trial_then_resume_finishes(postgres, tmp_path):
  from jaxclf.sweeps import runner
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY)
  workdir = tmp_path / "shared"
  url = postgres.create_database("optuna")  # postgresql://: the psycopg 3 driver is chosen
  assert runner.prepare(str(config), "lr", str(workdir), storage=url, grace_s=45)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
  env.pop("MLFLOW_TRACKING_URI", None)
  procs = [subprocess.Popen([sys.executable, "-m", "jaxclf.cli", "sweep", "--resume",
                             str(workdir), "--worker", "--worker-index", str(i), "--threads", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  plan = runner.load_plan(str(workdir))
  study = runner.open_study(plan, str(workdir))

  def both_mid_trial():  # each worker inside a trial
    running = {t.user_attrs.get("worker", "").rsplit(":", 1)[-1]: t
               for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"}
    return all(str(p.pid) in running for p in procs) and running
  running = _wait_until("two running trials", both_mid_trial, 600)
  victim = running[str(procs[0].pid)].number
  procs[0].send_signal(signal.SIGKILL)
  assert procs[0].wait(30) == -signal.SIGKILL
  _, err = procs[1].communicate(timeout=600)
  assert procs[1].returncode == 0, err  # the other worker went on and finished its trials
  # The grace period (45 s) outlasts the survivor's remaining trials, so the lost trial is still
  # RUNNING: the resume below is what runs it again.
  states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
  assert states[victim] == "RUNNING" and list(states.values()).count("COMPLETE") >= 2, states
  out = subprocess.run([sys.executable, "-m", "jaxclf.cli", "sweep", "--resume", str(workdir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert f"trial(s) [{victim}] lost their worker" in out.stdout, out.stdout
  trials = runner.open_study(plan, str(workdir)).trials
  retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
  assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
  assert [t.state.name for t in trials if t.number == victim] == ["FAIL"]
  assert {t.state.name for t in trials if t.number != victim} == {"COMPLETE"}
  for t in trials:  # each budgeted trial ran once, the killed one twice (in its own directory)
    if t.state.name == "COMPLETE":
      attempts = (workdir / t.user_attrs["run_dir"] / "trial.json").read_text().splitlines()
      assert len(attempts) == (2 if t.number == retry[0].number else 1), (t.number, attempts)
      run = json.loads((workdir / t.user_attrs["run_dir"] / "run.json").read_text())
      assert run["status"] == "completed"
