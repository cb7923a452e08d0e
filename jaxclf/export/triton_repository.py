"""Writing an export into a Triton model repository as registry version V, offline or live.

Each model holds version V (`V/` directories) and its config pins `version_policy: specific [V]`;
the ensemble steps name version V of every composing model, so the ensemble version a response
reports *is* the registry version that answered. Promoting another version is a `RepositoryUpdate`
(configs replaced atomically): offline `write_model_repository`; on a running server `live_update`
loads the new composing versions beside the old ones, switches the ensemble, waits for the old
ensemble version to drain (Triton unloads a version only once its in-flight requests are done),
then drops the old versions. Requests in flight finish on the old version, the next get the new.
The configs come from jaxclf.export.triton_config, the python models' sources from
serving/triton_models/.

This module imports neither jax nor onnx at load time: it runs in both the training and the
serving venv.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Mapping, Sequence

from jaxclf.artifacts import RAW_MODEL_FILE
from jaxclf.export.serving_env import REPO_ROOT
from jaxclf.export.triton_config import (ServingOptions, TritonConfigError,
                                         check_standard_interface, model_configs, model_names,
                                         parse_pbtxt, read_config, to_pbtxt)
from jaxclf.export.triton_server import reload_models, wait_unloaded
from jaxclf.hashing import sha256_file
from jaxclf.integrity import INTEGRITY_FILE

PYTHON_MODELS_DIR = os.path.join(REPO_ROOT, "serving", "triton_models")


def _python_model_source(kind: str) -> str:
  path = os.path.join(PYTHON_MODELS_DIR, f"{kind}.py")
  if not os.path.isfile(path):
    raise TritonConfigError(f"python model source {path} is missing")
  return path


def served_version(repo_dir: str, name: str) -> int | None:
  """The version the ensemble's config pins now (None when the model is not in the repository)."""
  d = os.path.join(repo_dir, model_names(name)["ensemble"])
  if not os.path.isfile(os.path.join(d, "config.pbtxt")):
    return None
  versions = list(read_config(d).version_policy.specific.versions)
  return int(versions[0]) if versions else None


@dataclasses.dataclass
class RepositoryUpdate:
  """Switching NAME in a repository to `version`, in three steps that a live server can follow:

    stage()     version directories of all models + composing configs pinned [previous, version]
                (both versions loadable, so requests already inside the old ensemble can finish)
    switch()    the ensemble's config pinned [version], its steps naming `version`
    finalize()  composing configs pinned [version]; other version directories removed

  Offline (`write_model_repository`) runs all three; `live_update` reloads the server between
  them. Every config was already rendered and parsed against ModelConfig when this was made."""
  export_dir: str
  repo_dir: str
  name: str
  version: int
  previous: int | None
  configs: dict[str, dict[str, Any]]
  files: dict[str, dict[str, str]]

  @property
  def names(self) -> dict[str, str]:
    return model_names(self.name)

  @property
  def composing(self) -> list[str]:
    return [self.names["preprocess"], self.names["classifier"], self.names["postprocess"]]

  def _write_config(self, model: str, versions: Sequence[int]) -> None:
    cfg = dict(self.configs[model], version_policy={"specific": {"versions": sorted(set(versions))}})
    _write_atomic(os.path.join(self.repo_dir, model, "config.pbtxt"), to_pbtxt(cfg))

  def stage(self) -> None:
    from jaxclf.export.onnx import LABELS_FILE
    for m in self.configs:
      model_dir = os.path.join(self.repo_dir, m)
      os.makedirs(model_dir, exist_ok=True)
      _install_version_dir(model_dir, self.version, self.files[m])
      # label_filename is resolved against the model directory, not the version directory.
      if any(o.get("label_filename") for o in self.configs[m].get("output", [])):
        _copy_atomic(os.path.join(self.export_dir, LABELS_FILE), os.path.join(model_dir, "labels.txt"))
    both = [v for v in (self.previous, self.version) if v]
    for m in self.configs:
      if m in self.composing:
        self._write_config(m, both)
      elif m == self.names["onnx"]:
        self._write_config(m, [self.version])

  def switch(self) -> None:
    self._write_config(self.names["ensemble"], [self.version])

  def finalize(self) -> list[str]:
    for m in self.composing:
      self._write_config(m, [self.version])
    pruned = []
    for m in self.configs:
      for entry in os.listdir(os.path.join(self.repo_dir, m)):
        if entry.isdigit() and int(entry) != self.version:
          shutil.rmtree(os.path.join(self.repo_dir, m, entry))
          pruned.append(f"{m}/{entry}")
    return pruned

  def summary(self) -> dict[str, Any]:
    return {"models": list(self.configs), "version": self.version, "previous": self.previous,
            "repository": os.path.abspath(self.repo_dir)}


def prepare_update(export_dir: str, repo_dir: str, name: str, version: int,
                   options: ServingOptions = ServingOptions(), *,
                   verify: bool = True) -> RepositoryUpdate:
  """Checks the export (sha256s), renders and validates every config; writes nothing."""
  from jaxclf.export.onnx import EXPORT_FILE, LABELS_FILE, SPEC_FILE, load_spec, verify_export
  if not name or not name.replace("_", "").replace("-", "").isalnum():
    raise TritonConfigError(f"model name {name!r}: use letters, digits, '_' and '-' only")
  version = int(version)
  if version < 1:
    raise TritonConfigError(f"version must be >= 1, got {version}")
  n = model_names(name)
  meta = verify_export(export_dir) if verify else {}
  if not os.path.isfile(os.path.join(export_dir, RAW_MODEL_FILE)):
    raise TritonConfigError(f"{export_dir} has no {RAW_MODEL_FILE} (the raw-pixel graph Triton's "
                            f"{n['classifier']} and {n['onnx']} load; exports made before it "
                            "existed lack it): export the run again (`jaxclf export`)")
  spec = load_spec(export_dir)
  num_classes = int(meta.get("model", {}).get("num_classes") or len(spec.class_names))
  configs = model_configs(name, spec.input_shape, num_classes, version, options)
  for m, cfg in configs.items():
    parsed = parse_pbtxt(to_pbtxt(cfg), f"{m}/config.pbtxt")
    if m in (n["classifier"], n["onnx"]):
      check_standard_interface(parsed, f"{m}/config.pbtxt")
  previous = served_version(repo_dir, name) if os.path.isdir(repo_dir) else None
  src = lambda f: os.path.join(export_dir, f)
  # The classifier checks the bytes it loads against this at initialize (jaxclf/integrity.py);
  # the hash is the one the export recorded (verified above), not one taken from the copy.
  recorded = ((meta.get("artifacts") or {}).get(RAW_MODEL_FILE) if verify
              else sha256_file(src(RAW_MODEL_FILE)))
  if not recorded:
    raise TritonConfigError(f"{export_dir}/{EXPORT_FILE} records no sha256 for {RAW_MODEL_FILE}: "
                            "refusing to serve an unverified model")
  integrity = (json.dumps({RAW_MODEL_FILE: recorded}, indent=2) + "\n").encode()
  files = {
      # NAME_onnx cannot check the hash itself (Triton's ORT backend reads the file); the record
      # beside it lets a deployment check the copy.
      n["onnx"]: {RAW_MODEL_FILE: src(RAW_MODEL_FILE), INTEGRITY_FILE: integrity},
      n["classifier"]: {"model.py": _python_model_source("classifier"),
                        RAW_MODEL_FILE: src(RAW_MODEL_FILE), INTEGRITY_FILE: integrity},
      n["preprocess"]: {"model.py": _python_model_source("preprocess"),
                        "preprocessing.json": src(SPEC_FILE)},
      n["postprocess"]: {"model.py": _python_model_source("postprocess"),
                         "labels.txt": src(LABELS_FILE)},
      n["ensemble"]: {},
  }
  order = [m for m in (n["onnx"], n["preprocess"], n["classifier"], n["postprocess"],
                       n["ensemble"]) if m in configs]
  return RepositoryUpdate(export_dir, repo_dir, name, version,
                          previous if previous != version else None,
                          {m: configs[m] for m in order}, {m: files[m] for m in order})


def write_model_repository(export_dir: str, repo_dir: str, name: str, version: int,
                           options: ServingOptions = ServingOptions(), *,
                           verify: bool = True) -> dict[str, Any]:
  """Writes (or switches) NAME's models in `repo_dir` to serve `export_dir` as `version`, with no
  server to coordinate with (a stopped server, or one in poll mode)."""
  update = prepare_update(export_dir, repo_dir, name, version, options, verify=verify)
  update.stage()
  update.switch()
  return {**update.summary(), "pruned": update.finalize()}


def live_update(update: RepositoryUpdate, url: str, timeout: float = 120, *,
                unload_previous: bool | None = None) -> dict[str, Any]:
  """Switches a running explicit-mode server to `update.version` with no failed request: load
  the new composing versions beside the old ones and move the ensemble (one load), wait until the
  old ensemble version has drained and unloaded, then pin the configs to the new version and
  prune old files.

  The idle old composing versions are unloaded now when `unload_previous`, else at the next
  switch. By default (None) they are unloaded now exactly when the old version is the higher one
  (a rollback): Triton sends an unversioned request to the highest *loaded* version, so a direct
  call to NAME (image_client, perf_analyzer) would otherwise still reach the rolled-back
  weights. The ensemble pins its versions and is right either way."""
  t0 = time.monotonic()
  steps = {}
  update.stage()
  update.switch()
  # One load of the ensemble: Triton first (re)loads the composing models it depends on, now
  # pinned to both versions, then the ensemble. Loading them one by one costs a reload round
  # each (Triton 2.51 reloads every version of a model whose files changed, and reloads the
  # ensemble after each), during which requests wait.
  ensemble = update.names["ensemble"]
  reload_models(url, [ensemble], timeout)
  steps["switch"] = round(time.monotonic() - t0, 3)
  if update.previous:
    wait_unloaded(url, ensemble, update.previous, timeout)
  steps["drained"] = round(time.monotonic() - t0, 3)
  pruned = update.finalize()
  if unload_previous is None:
    unload_previous = bool(update.previous and update.previous > update.version)
  if unload_previous:
    # Costs another reload round (about 2 s here, requests wait); otherwise the idle old
    # composing versions stay loaded until the next switch or restart.
    reload_models(url, update.composing, timeout)
  steps["finalized"] = round(time.monotonic() - t0, 3)
  return {**update.summary(), "pruned": pruned, "reloaded": url, "seconds": steps,
          "unloaded_previous": unload_previous}


def _install_version_dir(model_dir: str, version: int, files: Mapping[str, str]) -> None:
  final = os.path.join(model_dir, str(version))
  stage = os.path.join(model_dir, f".staging-{version}-{os.getpid()}")
  shutil.rmtree(stage, ignore_errors=True)
  os.makedirs(stage)
  for dest, path in files.items():
    if isinstance(path, bytes):  # generated content (integrity.json)
      with open(os.path.join(stage, dest), "wb") as f:
        f.write(path)
    else:
      shutil.copyfile(path, os.path.join(stage, dest))
  if os.path.isdir(final):
    if _same_files(stage, final):  # re-promoting the same version: leave loaded files alone
      shutil.rmtree(stage)
      return
    shutil.rmtree(final)
  os.rename(stage, final)


def _same_files(a: str, b: str) -> bool:
  import filecmp
  names = sorted(os.listdir(a))
  if names != sorted(os.listdir(b)):
    return False
  return all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in names)


def _write_atomic(path: str, text: str) -> None:
  if os.path.isfile(path) and open(path).read() == text:
    return  # unchanged: keep the timestamp Triton looks at
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _copy_atomic(src: str, dest: str) -> None:
  """Leaves an identical file untouched: Triton treats a changed model-level file as a change
  to every version and reloads them all."""
  import filecmp
  if os.path.isfile(dest) and filecmp.cmp(src, dest, shallow=False):
    return
  tmp = f"{dest}.tmp-{os.getpid()}"
  shutil.copyfile(src, tmp)
  os.replace(tmp, dest)
