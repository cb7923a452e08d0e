"""jaxclf's registry mirrored into MLflow's Model Registry, and `models:/` URIs resolved back.

  register_export(export_dir, name, uri)   the export dir as it is (model.onnx, model_raw.onnx,
                                           preprocessing.json, labels.txt, export.json with its
                                           sha256s) + an MLmodel file with the input/output
                                           signature, logged under `model-vN/` (N: the jaxclf
                                           registry version) of the MLflow run that trained it,
                                           then a version of registered model NAME
                                           (mlflow.register_model)
  mirror_stage(uri, name, stage, version)  a jaxclf stage as an MLflow alias
                                           (production -> @production; JAXCLF_MLFLOW_ALIASES
                                           renames: "production=champion,staging=challenger")
  download_model("models:/NAME@alias")     -> a local export dir, its sha256s checked

jaxclf's registry stays the source of truth for stages, the gate and the audit log: an alias is
a pointer set from it, never read back into it. The MLflow side carries what MLflow tooling
needs (`models:/NAME@production`, the UI, webhooks on new versions).

Each MLflow model version is tagged with the jaxclf registry version it mirrors and the sha256
of export.json. export.json lists the sha256 of every other file, so a download is checked end
to end against a value held by the registry's database, not by the artefact store.

mlflow (the mlflow-skinny client) is imported inside the functions only: this module is reached
from the CLI and orchestration layers, never from the training core.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from jaxclf.artifacts import (EXPORT_FILE, MODEL_FILE, ArtifactError, verify_export_dir)
from jaxclf.hashing import sha256_file
from jaxclf.tracking.run_record import flatten

ALIASES_ENV = "JAXCLF_MLFLOW_ALIASES"
TAG_VERSION, TAG_EXPORT_SHA = "jaxclf.registry_version", "jaxclf.export_json_sha256"
TAG_MODEL_SHA, TAG_ROOT = "jaxclf.model_sha256", "jaxclf.registry_root"
URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class MlflowRegistryError(RuntimeError):
  """One line naming the model URI, the alias or the file that is wrong."""


def _client(uri: str):
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
  # no tqdm bars on stderr: a failed download must stay one error line
  os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
  from mlflow.tracking import MlflowClient
  return MlflowClient(tracking_uri=uri, registry_uri=uri)


def tracking_uri(export_meta: dict[str, Any] | None = None) -> str:
  """MLFLOW_TRACKING_URI, else the training config's tracking.mlflow_uri ('' when neither)."""
  config = ((export_meta or {}).get("source") or {}).get("config") or {}
  return os.environ.get("MLFLOW_TRACKING_URI") or str(
      (config.get("tracking") or {}).get("mlflow_uri") or "")


# ----------------------------------------------------------------------------- register

def signature(model: dict[str, Any]) -> dict[str, str]:
  """The ONNX graph's input and output as MLflow's tensor signature, in the MLmodel file's own
  format (mlflow.models.signature builds the same, but imports pandas, which the lock lacks)."""
  def spec(name_key: str, default: str, shape_key: str) -> str:
    shape = [-1 if d is None else int(d) for d in model[shape_key]]
    return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": shape},
                        "name": model.get(name_key, default)}])
  return {"inputs": spec("input_name", "input", "input_shape"),
          "outputs": spec("output_name", "logits", "output_shape"), "params": None}


def artifact_path(registry_version: int | None, export_sha: str) -> str:
  """Where in the run the export goes: one directory per registration, so two exports of one
  run (best and latest checkpoint, say) never overwrite each other's files."""
  return f"model-v{registry_version}" if registry_version is not None else \
      f"model-{export_sha[:12]}"


def _stage_model_dir(export_dir: str, meta: dict[str, Any], run_id: str, path: str) -> str:
  """A temporary copy of the export dir plus the MLmodel file (the export dir is not touched)."""
  import yaml
  from mlflow.models import Model
  stage = tempfile.mkdtemp(prefix="jaxclf-mlflow-model-")
  for f in sorted(os.listdir(export_dir)):
    if os.path.isfile(os.path.join(export_dir, f)) and not f.startswith("."):
      shutil.copy2(os.path.join(export_dir, f), os.path.join(stage, f))
  mlmodel = Model(artifact_path=path, run_id=run_id,
                  metadata={"format": meta.get("format"), "export_json": EXPORT_FILE,
                            "served_by": "jaxclf serve --model-path models:/NAME@alias"})
  mlmodel.add_flavor("onnx", onnx_version=str(meta["model"].get("onnx")), data=MODEL_FILE,
                     providers=["CPUExecutionProvider"])
  mlmodel.add_flavor("jaxclf", export_format=meta.get("format"),
                     format_version=meta.get("format_version"), data=".")
  doc = {**mlmodel.to_dict(), "signature": signature(meta["model"])}
  with open(os.path.join(stage, "MLmodel"), "w") as f:
    yaml.safe_dump(doc, f, default_flow_style=False, sort_keys=True)
  return stage


def _source_run(client, meta: dict[str, Any]) -> str:
  """The MLflow run that trained the export: the one the run logged to (run.json's mlflow), else
  one made now for that run directory (found again by its jaxclf.workdir tag on a later call)."""
  source = meta.get("source") or {}
  run_id = source.get("mlflow_run_id")
  if run_id:
    try:
      client.get_run(run_id)
      return run_id
    except Exception:  # noqa: BLE001 - logged to another server: make one on this one
      pass
  config = source.get("config") or {}
  exp_name = str((config.get("tracking") or {}).get("mlflow_experiment") or config.get("name")
                 or "jaxclf")
  exp = client.get_experiment_by_name(exp_name)
  exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
  run_dir = str(source.get("run_dir") or "")
  found = client.search_runs([exp_id], f"tags.`jaxclf.workdir` = '{run_dir}'", max_results=1)
  if found:
    return found[0].info.run_id
  return _log_finished_run(client, exp_id, run_dir, config, source.get("metrics") or {})


def _log_finished_run(client, exp_id: str, run_dir: str, config: dict, metrics: dict) -> str:
  from mlflow.entities import Metric, Param
  run_id = client.create_run(exp_id, tags={
      "jaxclf.workdir": run_dir, "mlflow.runName": os.path.basename(run_dir) or "run",
      "jaxclf.logged_at": "registration"}).info.run_id
  params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
  for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
    client.log_batch(run_id, params=params[i:i + 100])
  final = [Metric(f"final_{split}_{k}", float(v), 0, 0)
           for split, m in metrics.items() if isinstance(m, dict)
           for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
  client.log_batch(run_id, metrics=final)
  # set_terminated writes "View run ... at ..." to stdout, which is the CLI's JSON answer
  with contextlib.redirect_stdout(sys.stderr):
    client.set_terminated(run_id, "FINISHED")
  return run_id


def register_export(export_dir: str, name: str, uri: str, *, registry_version: int | None = None,
                    registry_root: str | None = None) -> dict[str, Any]:
  """Logs the export under the training run and registers it as a new version of NAME."""
  import mlflow
  try:
    meta = verify_export_dir(export_dir)
  except ArtifactError as e:
    raise MlflowRegistryError(f"refusing to register {export_dir} in MLflow: {e}") from None
  client = _client(uri)
  run_id = _source_run(client, meta)
  export_sha = sha256_file(os.path.join(export_dir, EXPORT_FILE))
  path = artifact_path(registry_version, export_sha)
  stage = _stage_model_dir(export_dir, meta, run_id, path)
  try:
    client.log_artifacts(run_id, stage, path)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  tags = {TAG_EXPORT_SHA: export_sha, TAG_MODEL_SHA: meta["artifacts"][MODEL_FILE]}
  if registry_version is not None:
    tags[TAG_VERSION] = str(registry_version)
  if registry_root:
    tags[TAG_ROOT] = registry_root
  mlflow.set_tracking_uri(uri)  # register_model is fluent: it reads the process's URIs
  mlflow.set_registry_uri(uri)
  mv = mlflow.register_model(f"runs:/{run_id}/{path}", name, tags=tags)
  return {"name": name, "version": int(mv.version), "run_id": run_id, "tracking_uri": uri,
          "model_uri": f"models:/{name}/{mv.version}"}


# ----------------------------------------------------------------------------- aliases

def alias_for(stage: str) -> str:
  """The MLflow alias that mirrors a jaxclf stage (JAXCLF_MLFLOW_ALIASES may rename it)."""
  pairs = [p.partition("=") for p in os.environ.get(ALIASES_ENV, "").split(",") if p.strip()]
  return {k.strip(): v.strip() for k, _, v in pairs}.get(stage, stage)


def _mlflow_version(client, name: str, registry_version: int) -> str | None:
  """The newest MLflow version of NAME that mirrors jaxclf version `registry_version`."""
  found = [mv for mv in client.search_model_versions(f"name = '{name}'")
           if mv.tags.get(TAG_VERSION) == str(registry_version)]
  return max((mv.version for mv in found), key=int) if found else None


def mirror_stage(uri: str, name: str, stage: str, registry_version: int) -> dict[str, Any]:
  """Points alias_for(stage) at the MLflow version mirroring `registry_version`. Returns what
  was done (for the audit log); a version never registered in MLflow is reported, not fatal."""
  client = _client(uri)
  alias = alias_for(stage)
  out = {"tracking_uri": uri, "alias": alias, "stage": stage, "version": registry_version}
  mv = _mlflow_version(client, name, registry_version)
  if mv is None:
    return {**out, "mlflow_version": None,
            "skipped": f"v{registry_version} was not registered in MLflow (export --register)"}
  client.set_registered_model_alias(name, alias, mv)
  return {**out, "mlflow_version": int(mv)}


# ----------------------------------------------------------------------------- download

def parse_models_uri(uri: str) -> tuple[str, str | None, int | None]:
  m = URI_RE.match(uri)
  if not m:
    raise MlflowRegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
  return m["name"], m["alias"], int(m["version"]) if m["version"] else None


def _lookup(client, uri: str, name: str, alias: str | None, version: int | None):
  from mlflow.exceptions import MlflowException
  try:
    if alias is not None:
      return client.get_model_version_by_alias(name, alias)
    return client.get_model_version(name, str(version))
  except MlflowException as e:
    what = f"alias @{alias}" if alias is not None else f"version {version}"
    first = str(e.message if hasattr(e, "message") else e).splitlines()[0]
    raise MlflowRegistryError(f"{uri}: MLflow registered model {name!r} has no {what} "
                              f"({first})") from None


def download_model(uri: str, dest_root: str | None = None, tracking: str | None = None) -> str:
  """models:/NAME@alias | models:/NAME/N -> a local export dir whose export.json matches the
  version's tag and whose files match export.json (downloaded with MLflow's client)."""
  return fetch_model(uri, dest_root, tracking)[0]


def fetch_model(uri: str, dest_root: str | None = None,
                tracking: str | None = None) -> tuple[str, int]:
  """download_model, and the MLflow version number the URI resolved to."""
  name, alias, version = parse_models_uri(uri)
  server = tracking or os.environ.get("MLFLOW_TRACKING_URI", "")
  if not server:
    raise MlflowRegistryError(f"{uri}: set MLFLOW_TRACKING_URI to the MLflow server that "
                              "holds the registered model")
  try:
    import mlflow  # noqa: F401
  except ImportError:
    raise MlflowRegistryError(f"{uri}: models:/ URIs need the MLflow client, which this "
                              "environment lacks (pip install -r requirements/sweeps.txt), or "
                              "resolve the model where it is installed and pass the export "
                              "directory") from None
  try:
    return _fetch(uri, name, alias, version, server, dest_root)
  except MlflowRegistryError:
    raise
  except Exception as e:  # noqa: BLE001 - the client's errors (unreachable, refused): one line
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise MlflowRegistryError(f"{uri}: MLflow at {server}: {first}") from None


def _fetch(uri: str, name: str, alias: str | None, version: int | None, server: str,
           dest_root: str | None) -> tuple[str, int]:
  import mlflow.artifacts
  client = _client(server)
  mv = _lookup(client, uri, name, alias, version)
  dest_root = dest_root or os.path.join(os.environ.get("JAXCLF_CACHE") or os.path.expanduser(
      "~/.cache/jaxclf"), "mlflow-models")
  dest = os.path.join(dest_root, name, str(mv.version))
  shutil.rmtree(dest, ignore_errors=True)  # never trust an earlier download: fetch and check
  os.makedirs(dest, exist_ok=True)
  local = mlflow.artifacts.download_artifacts(
      artifact_uri=client.get_model_version_download_uri(name, mv.version), dst_path=dest,
      tracking_uri=server)
  _check_download(uri, mv, local)
  return local, int(mv.version)


def _check_download(uri: str, mv, local: str) -> None:
  path = os.path.join(local, EXPORT_FILE)
  want = mv.tags.get(TAG_EXPORT_SHA)
  if not want:
    raise MlflowRegistryError(f"{uri}: version {mv.version} has no {TAG_EXPORT_SHA} tag; it was "
                              "not registered by `jaxclf export --register`")
  if not os.path.isfile(path):
    raise MlflowRegistryError(f"{uri}: {EXPORT_FILE} is missing from the downloaded artefacts")
  got = sha256_file(path)
  if got != want:
    raise MlflowRegistryError(f"{uri}: {EXPORT_FILE} sha256 {got[:16]}… does not match the "
                              f"version's {TAG_EXPORT_SHA} tag ({want[:16]}…): the artefact "
                              "was altered")
  try:
    verify_export_dir(local)
  except ArtifactError as e:
    raise MlflowRegistryError(f"{uri}: {e}") from None
