"""Optional MLflow logging of a run: params, per-epoch metrics, tags, artifacts.

Turned on by `tracking.mlflow_uri` (or the MLFLOW_TRACKING_URI environment variable). Uses the
light `mlflow-skinny` client (requirements/sweeps.txt); the server runs in its own environment
(scripts/setup_mlflow_env.sh). mlflow is imported here only, and only when a URI is set: the
training core never imports it. Tracking never kills training: an unreachable server or any
client error becomes one warning and the run goes on without MLflow.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

from jaxclf.tracking.run_record import flatten

log = logging.getLogger("jaxclf.mlflow")
ARTIFACTS = ("config.json", "run.json", "preprocessing.json", "data_report.json", "report.html",
             "metrics.json")


def tracking_uri(config) -> str:
  uri = ""
  if "tracking" in config:
    uri = str(config.tracking.mlflow_uri or "")
  return uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def _reachable(uri: str) -> str | None:
  """None when the server answers /health, else why not (only http(s) URIs are probed)."""
  if not uri.startswith(("http://", "https://")):
    return None
  try:
    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as r:
      r.read()
    return None
  except OSError as e:
    return str(e)


class MlflowRun:
  """One MLflow run mirroring one jaxclf run directory. Every method swallows client errors."""

  def __init__(self, client, run_id: str, uri: str):
    self.client, self.run_id, self.uri = client, run_id, uri
    self.ok = True

  def _safe(self, what: str, fn, *args, **kwargs) -> None:
    if not self.ok:
      return
    try:
      fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
      self.ok = False
      log.warning("MLflow at %s: %s failed (%s); training goes on without MLflow", self.uri,
                  what, e)

  def log_epoch(self, entry: dict[str, Any]) -> None:
    from mlflow.entities import Metric
    ts = int(float(entry.get("wall_time") or 0) * 1000)
    metrics = [Metric(k, float(v), ts, int(entry["epoch"])) for k, v in entry.items()
               if k not in ("epoch", "step", "wall_time") and isinstance(v, (int, float))]
    self._safe("log metrics", self.client.log_batch, self.run_id, metrics=metrics)

  def finish(self, record: dict[str, Any] | None, workdir: str, status: str) -> None:
    from mlflow.entities import Metric
    if record:
      final = []
      for split, m in (record.get("metrics") or {}).items():
        for k, v in (m or {}).items() if isinstance(m, dict) else ():
          if isinstance(v, (int, float)) and not isinstance(v, bool):
            final.append(Metric(f"final_{split}_{k}", float(v), 0, 0))
      if record.get("duration_s") is not None:
        final.append(Metric("duration_s", float(record["duration_s"]), 0, 0))
      self._safe("log final metrics", self.client.log_batch, self.run_id, metrics=final)
      self._safe("set tag", self.client.set_tag, self.run_id, "jaxclf.status",
                 str(record.get("status")))
      version = (record.get("dataset") or {}).get("version")
      if version:
        self._safe("set tag", self.client.set_tag, self.run_id, "dataset_version", str(version))
    for name in ARTIFACTS:
      path = os.path.join(workdir, name)
      if os.path.isfile(path):
        self._safe(f"log artifact {name}", self.client.log_artifact, self.run_id, path)
    self._safe("end run", self.client.set_terminated, self.run_id, status)


def start_run(config, workdir: str, tags: dict[str, str] | None = None) -> MlflowRun | None:
  """An MLflow run for this config, or None when MLflow is off or cannot be reached."""
  uri = tracking_uri(config)
  if not uri:
    return None
  why = _reachable(uri)
  if why:
    log.warning("MLflow tracking server %s is unreachable (%s); training goes on without it",
                uri, why)
    return None
  try:
    return _create_run(config, workdir, uri, tags or {})
  except Exception as e:  # noqa: BLE001 - a missing client, a refused request: warn, train on
    log.warning("MLflow at %s: cannot start a run (%s); training goes on without it", uri, e)
    return None


def _create_run(config, workdir: str, uri: str, tags: dict[str, str]) -> MlflowRun:
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
  from mlflow.entities import Param, RunTag
  from mlflow.tracking import MlflowClient

  from jaxclf.tracking.run_record import git_info
  client = MlflowClient(tracking_uri=uri)
  name = str(config.tracking.mlflow_experiment or config.name) if "tracking" in config \
      else str(config.name)
  exp = client.get_experiment_by_name(name)
  exp_id = exp.experiment_id if exp else client.create_experiment(name)
  git = git_info(os.path.dirname(os.path.abspath(__file__)))
  all_tags = {"jaxclf.workdir": os.path.abspath(workdir), "git_commit": git.get("commit") or "",
              "mlflow.runName": os.path.basename(os.path.abspath(workdir)), **tags}
  existing = _existing_run(workdir)
  if existing:  # a resumed run continues its MLflow run
    run_id = existing
    client.update_run(run_id, status="RUNNING")
  else:
    run_id = client.create_run(exp_id, tags=all_tags).info.run_id
    params = [Param(k, str(v)[:500]) for k, v in flatten(config.to_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
      client.log_batch(run_id, params=params[i:i + 100])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "mlflow.json"), "w") as f:
      json.dump({"run_id": run_id, "tracking_uri": uri, "experiment_id": exp_id}, f)
  client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
  return MlflowRun(client, run_id, uri)


def _existing_run(workdir: str) -> str | None:
  path = os.path.join(workdir, "mlflow.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f).get("run_id")
  return None
