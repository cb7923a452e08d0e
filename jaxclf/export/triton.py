"""Triton model repository from an export directory, and the Triton server that serves it here.

One source of truth: `model_configs()` returns plain dicts, one per model; they become
config.pbtxt through Triton's own `ModelConfig` protobuf (shipped in tritonclient), so a config
that does not parse against Triton's schema is never written. For export NAME, registry version V:

  NAME_onnx/        platform onnxruntime_onnx, for GPU servers: dynamic batching (preferred sizes,
                    queue delay), KIND_GPU instances, warmup, TensorRT accelerator (FP16, engine
                    cache). Written but NOT loaded here: the pytriton-bundled tritonserver has only
                    the python backend, so `servable_models()` leaves it out.
  NAME/             python-backend twin of NAME_onnx: onnxruntime on CPU (serving/triton_models/
                    classifier.py).
  NAME_preprocess/  python backend: encoded image bytes -> raw pixels (decode, resize, centre crop:
                    jaxclf.data.decode + jaxclf.data.transforms, the export's preprocessing.json).
  NAME_postprocess/ python backend: logits -> probabilities, top_scores, top_indices, top_labels.
  NAME_image/       ensemble of the three: image bytes -> probabilities (labels.txt attached, so
                    Triton's classification extension works: request `class_count`) + top_labels
                    and top_scores.

NAME and NAME_onnx have Triton's standard image-classifier interface (what its example
image_client.py and perf_analyzer's random data need): ONE input `pixels` FP32 [H, W, C] with
`format: FORMAT_NHWC`, raw 0-255 pixels, and ONE output `logits` FP32 [K] with labels.txt.
Both load the export's model_raw.onnx, whose first nodes normalise (jaxclf.export.onnx);
`check_standard_interface` holds every config that declares an image format to that contract.

Each model holds version V (`V/` directories) and its config pins `version_policy: specific [V]`;
the ensemble steps name version V of every composing model, so the ensemble version a response
reports *is* the registry version that answered. Promoting another version is a `RepositoryUpdate`
(configs replaced atomically): offline `write_model_repository`; on a running server `live_update`
loads the new composing versions beside the old ones, switches the ensemble, waits for the old
ensemble version to drain (Triton unloads a version only once its in-flight requests are done),
then drops the old versions. Requests in flight finish on the old version, the next get the new.

The server: `TritonServer` runs `tritonserver` from the serving venv (.venv-serve, built by
scripts/setup_serving_env.sh) with LD_LIBRARY_PATH = interpreter LIBDIR + nvidia_pytriton.libs and
the venv's bin first on PATH, in explicit model-control mode loading the servable models.

This module imports neither jax nor onnx: it runs in both the training and the serving venv.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

from jaxclf.artifacts import RAW_MODEL_FILE
from jaxclf.hashing import sha256_file
from jaxclf.integrity import INTEGRITY_FILE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_MODELS_DIR = os.path.join(REPO_ROOT, "serving", "triton_models")
ENSEMBLE_INPUT = "image"
ENSEMBLE_OUTPUTS = ("probabilities", "top_labels", "top_scores")
# model_raw.onnx's tensor names (jaxclf.export.onnx RAW_INPUT_NAME / OUTPUT_NAME; this module does
# not import the exporter at load time): the standard interface of NAME and NAME_onnx.
CLASSIFIER_INPUT, CLASSIFIER_OUTPUT = "pixels", "logits"
POSTPROCESS_OUTPUTS = ("probabilities", "top_scores", "top_indices", "top_labels")


class TritonConfigError(RuntimeError):
  """A model configuration that Triton's schema rejects, or a repository that cannot be written."""


class ServingEnvError(RuntimeError):
  """The serving venv (tritonserver, python backend) is missing or incomplete."""


class TritonServerError(RuntimeError):
  """The server did not start, died, or refused a repository request."""


@dataclasses.dataclass(frozen=True)
class ServingOptions:
  """Knobs of the generated configs. Defaults are measured on the 2-core CPU machine (a queue
  delay costs latency there: 1.5 ms of delay made the ensemble p50 5.6 ms instead of 0.84 ms)."""
  max_batch_size: int = 64
  top_k: int = 5
  cpu_queue_delay_us: int = 0
  classifier_instances: int = 1
  preprocess_instances: int = 1
  postprocess_instances: int = 1
  intra_op_threads: int = 1
  # GPU (NAME_onnx) only:
  gpu: bool = True
  gpu_instances: int = 1
  gpu_preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
  gpu_queue_delay_us: int = 500
  tensorrt: bool = True
  tensorrt_precision: str = "FP16"
  tensorrt_workspace_bytes: int = 1 << 30
  tensorrt_cache_dir: str = "/tmp/triton_trt_cache"
  warmup_batch_size: int = 8


def model_names(name: str) -> dict[str, str]:
  return {"onnx": f"{name}_onnx", "classifier": name, "preprocess": f"{name}_preprocess",
          "postprocess": f"{name}_postprocess", "ensemble": f"{name}_image"}


def _tensor(name: str, dtype: str, dims: Sequence[int], **extra) -> dict[str, Any]:
  return {"name": name, "data_type": dtype, "dims": [int(d) for d in dims], **extra}


def model_configs(name: str, input_shape: Sequence[int], num_classes: int, version: int,
                  options: ServingOptions = ServingOptions()) -> dict[str, dict[str, Any]]:
  """The one source of truth: model name -> ModelConfig as a dict (proto field names)."""
  n = model_names(name)
  o = options
  hwc = [int(d) for d in input_shape]
  k = min(o.top_k, num_classes)
  pinned = {"specific": {"versions": [int(version)]}}
  params = lambda **kw: {key: {"string_value": str(v)} for key, v in kw.items()}
  # The standard interface, shared by NAME_onnx and its CPU twin NAME.
  pixels_in = [_tensor(CLASSIFIER_INPUT, "TYPE_FP32", hwc, format="FORMAT_NHWC")]
  logits_out = [_tensor(CLASSIFIER_OUTPUT, "TYPE_FP32", [num_classes], label_filename="labels.txt")]
  configs: dict[str, dict[str, Any]] = {}
  if o.gpu:
    gpu: dict[str, Any] = {
        "name": n["onnx"], "platform": "onnxruntime_onnx", "max_batch_size": o.max_batch_size,
        "version_policy": pinned, "default_model_filename": RAW_MODEL_FILE,
        "input": pixels_in, "output": logits_out,
        "dynamic_batching": {"preferred_batch_size": list(o.gpu_preferred_batch_sizes),
                             "max_queue_delay_microseconds": o.gpu_queue_delay_us},
        "instance_group": [{"count": o.gpu_instances, "kind": "KIND_GPU"}],
        "model_warmup": [{"name": "random_batch", "batch_size": o.warmup_batch_size,
                          "inputs": {CLASSIFIER_INPUT: {"data_type": "TYPE_FP32", "dims": hwc,
                                                        "random_data": True}}}],
    }
    if o.tensorrt:
      gpu["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{
          "name": "tensorrt",
          # A plain string map here (Accelerator.parameters), unlike ModelConfig.parameters.
          "parameters": {"precision_mode": o.tensorrt_precision,
                         "max_workspace_size_bytes": str(o.tensorrt_workspace_bytes),
                         "trt_engine_cache_enable": "true",
                         "trt_engine_cache_path": os.path.join(o.tensorrt_cache_dir, n["onnx"])},
      }]}}
    configs[n["onnx"]] = gpu
  configs[n["preprocess"]] = {
      "name": n["preprocess"], "backend": "python", "max_batch_size": o.max_batch_size,
      "version_policy": pinned,
      "input": [_tensor(ENSEMBLE_INPUT, "TYPE_STRING", [1])],
      "output": [_tensor(CLASSIFIER_INPUT, "TYPE_FP32", hwc)],
      "dynamic_batching": {"max_queue_delay_microseconds": o.cpu_queue_delay_us},
      "instance_group": [{"count": o.preprocess_instances, "kind": "KIND_CPU"}],
  }
  configs[n["classifier"]] = {
      "name": n["classifier"], "backend": "python", "max_batch_size": o.max_batch_size,
      "version_policy": pinned,
      "input": pixels_in, "output": logits_out,
      "dynamic_batching": {"max_queue_delay_microseconds": o.cpu_queue_delay_us},
      "instance_group": [{"count": o.classifier_instances, "kind": "KIND_CPU"}],
      "parameters": params(intra_op_threads=o.intra_op_threads),
      "model_warmup": [{"name": "zeros", "batch_size": 1,
                        "inputs": {CLASSIFIER_INPUT: {"data_type": "TYPE_FP32", "dims": hwc,
                                                      "zero_data": True}}}],
  }
  configs[n["postprocess"]] = {
      "name": n["postprocess"], "backend": "python", "max_batch_size": o.max_batch_size,
      "version_policy": pinned,
      "input": [_tensor(CLASSIFIER_OUTPUT, "TYPE_FP32", [num_classes])],
      "output": [_tensor("probabilities", "TYPE_FP32", [num_classes], label_filename="labels.txt"),
                 _tensor("top_scores", "TYPE_FP32", [k]),
                 _tensor("top_indices", "TYPE_INT32", [k]),
                 _tensor("top_labels", "TYPE_STRING", [k])],
      "dynamic_batching": {"max_queue_delay_microseconds": o.cpu_queue_delay_us},
      "instance_group": [{"count": o.postprocess_instances, "kind": "KIND_CPU"}],
      "parameters": params(top_k=k),
  }
  configs[n["ensemble"]] = {
      "name": n["ensemble"], "platform": "ensemble", "max_batch_size": o.max_batch_size,
      "version_policy": pinned,
      "input": [_tensor(ENSEMBLE_INPUT, "TYPE_STRING", [1])],
      "output": [_tensor("probabilities", "TYPE_FP32", [num_classes], label_filename="labels.txt"),
                 _tensor("top_labels", "TYPE_STRING", [k]),
                 _tensor("top_scores", "TYPE_FP32", [k])],
      "ensemble_scheduling": {"step": [
          {"model_name": n["preprocess"], "model_version": int(version),
           "input_map": {ENSEMBLE_INPUT: ENSEMBLE_INPUT},
           "output_map": {CLASSIFIER_INPUT: "raw_pixels"}},
          {"model_name": n["classifier"], "model_version": int(version),
           "input_map": {CLASSIFIER_INPUT: "raw_pixels"},
           "output_map": {CLASSIFIER_OUTPUT: "logits"}},
          {"model_name": n["postprocess"], "model_version": int(version),
           "input_map": {CLASSIFIER_OUTPUT: "logits"},
           "output_map": {o_: o_ for o_ in ENSEMBLE_OUTPUTS}},
      ]},
  }
  return configs


# ----------------------------------------------------------------------------- config <-> pbtxt

@functools.lru_cache(maxsize=1)
def model_config_module():
  """Triton's model_config_pb2. tritonclient pins numpy<2, so the training venv does not install
  it; there the generated module is loaded from the serving venv's copy (it needs only protobuf,
  and parses fine with protobuf 7)."""
  try:
    from tritonclient.grpc import model_config_pb2
    return model_config_pb2
  except (ImportError, RuntimeError):
    pass
  venv = _serving_venv_dir()
  found = sorted(glob.glob(os.path.join(venv, "lib", "python*", "site-packages", "tritonclient",
                                        "grpc", "model_config_pb2.py")))
  if not found:
    raise ServingEnvError(f"Triton's ModelConfig schema (tritonclient) is not importable and not in "
                          f"{venv}; build the serving env: scripts/setup_serving_env.sh")
  spec = importlib.util.spec_from_file_location("jaxclf_triton_model_config_pb2", found[-1])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def to_pbtxt(config: Mapping[str, Any]) -> str:
  """dict -> config.pbtxt text, through the ModelConfig message (unknown fields or bad enum
  values raise TritonConfigError naming the model)."""
  from google.protobuf import json_format, text_format
  pb = model_config_module()
  try:
    msg = json_format.ParseDict(dict(config), pb.ModelConfig())
  except json_format.ParseError as e:
    raise TritonConfigError(f"model {config.get('name')!r}: invalid config: {e}") from None
  return text_format.MessageToString(msg)


def parse_pbtxt(text: str, source: str = "config.pbtxt"):
  """config.pbtxt text -> ModelConfig message; raises TritonConfigError naming `source`."""
  from google.protobuf import text_format
  pb = model_config_module()
  try:
    return text_format.Parse(text, pb.ModelConfig())
  except text_format.ParseError as e:
    raise TritonConfigError(f"{source}: not a valid Triton ModelConfig: {e}") from None


def read_config(model_dir: str):
  path = os.path.join(model_dir, "config.pbtxt")
  with open(path) as f:
    return parse_pbtxt(f.read(), path)


def validate_repository(repo_dir: str) -> dict[str, Any]:
  """Parses every config.pbtxt and checks the cross-model facts Triton would only report at load
  time: name = directory, pinned versions exist, ensemble steps name models and versions present."""
  if not os.path.isdir(repo_dir):
    raise TritonConfigError(f"model repository {repo_dir} does not exist")
  configs = {}
  for model_dir in sorted(glob.glob(os.path.join(repo_dir, "*", "config.pbtxt"))):
    d = os.path.dirname(model_dir)
    cfg = read_config(d)
    if cfg.name != os.path.basename(d):
      raise TritonConfigError(f"{model_dir}: name {cfg.name!r} differs from its directory")
    for v in cfg.version_policy.specific.versions:
      if not os.path.isdir(os.path.join(d, str(v))):
        raise TritonConfigError(f"{model_dir}: pins version {v} but {d}/{v}/ does not exist")
    if cfg.platform != "ensemble" and any(i.format for i in cfg.input):
      # Declaring an image format is claiming the standard interface: hold it to that.
      check_standard_interface(cfg, model_dir, d)
    configs[cfg.name] = cfg
  for cfg in configs.values():
    for step in cfg.ensemble_scheduling.step:
      if step.model_name not in configs:
        raise TritonConfigError(f"ensemble {cfg.name}: step model {step.model_name!r} is not in "
                                f"{repo_dir}")
      dep = configs[step.model_name]
      if step.model_version <= 0:
        continue
      pinned = dep.version_policy.WhichOneof("policy_choice") == "specific"
      if (step.model_version not in dep.version_policy.specific.versions if pinned else
          not os.path.isdir(os.path.join(repo_dir, step.model_name, str(step.model_version)))):
        raise TritonConfigError(f"ensemble {cfg.name}: step wants {step.model_name} version "
                                f"{step.model_version}, which its config does not serve")
  return configs


IMAGE_FORMATS = ("FORMAT_NHWC", "FORMAT_NCHW")


def check_standard_interface(cfg, source: str, model_dir: str | None = None) -> dict[str, Any]:
  """The contract of Triton's example image_client.py (triton-inference-server/client) and of
  any classification-extension client, on a parsed ModelConfig: exactly one input, FP32, with an
  image format over 3 non-batch dims (1 or 3 channels); exactly one output, FP32, a vector (at
  most one dim > 1), with a label_filename (present in `model_dir` when given, one line per
  class). Raises TritonConfigError naming `source` and the broken rule; returns the interface."""
  pb = model_config_module()

  def fail(why: str):
    raise TritonConfigError(f"{source}: not Triton's standard image interface: {why}")

  if len(cfg.input) != 1 or len(cfg.output) != 1:
    fail(f"expecting 1 input and 1 output, got {len(cfg.input)} and {len(cfg.output)}")
  inp, out = cfg.input[0], cfg.output[0]
  fmt = pb.ModelInput.Format.Name(inp.format)
  if fmt not in IMAGE_FORMATS:
    fail(f"input {inp.name!r} has format {fmt}, expecting one of {', '.join(IMAGE_FORMATS)}")
  if len(inp.dims) != 3:
    fail(f"input {inp.name!r} has dims {list(inp.dims)}, expecting 3 (H, W, C or C, H, W)")
  channels = inp.dims[2] if fmt == "FORMAT_NHWC" else inp.dims[0]
  if channels not in (1, 3):
    fail(f"input {inp.name!r} has {channels} channels, expecting 1 or 3")
  for t, what in ((inp, "input"), (out, "output")):
    if pb.DataType.Name(t.data_type) != "TYPE_FP32":
      fail(f"{what} {t.name!r} is {pb.DataType.Name(t.data_type)}, expecting TYPE_FP32")
  if sum(1 for d in out.dims if d != 1) != 1 or any(d < 1 for d in out.dims):
    fail(f"output {out.name!r} has dims {list(out.dims)}, expecting a vector of class scores")
  if not out.label_filename:
    fail(f"output {out.name!r} has no label_filename (the classification extension needs one)")
  classes = max(out.dims)
  if model_dir is not None:
    path = os.path.join(model_dir, out.label_filename)
    if not os.path.isfile(path):
      fail(f"label_filename {path} does not exist")
    with open(path, encoding="utf-8") as f:
      count = sum(1 for line in f if line.strip())
    if count != classes:
      fail(f"{path} has {count} labels for {classes} output classes")
  return {"input": inp.name, "format": fmt, "dims": list(inp.dims), "output": out.name,
          "classes": int(classes), "label_filename": out.label_filename,
          "max_batch_size": int(cfg.max_batch_size)}


# ----------------------------------------------------------------------------- repository writer

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


# ----------------------------------------------------------------------------- the server

def _serving_venv_dir(venv: str | None = None) -> str:
  return os.path.abspath(venv or os.environ.get("JAXCLF_SERVING_VENV")
                         or os.path.join(REPO_ROOT, ".venv-serve"))


@dataclasses.dataclass(frozen=True)
class ServingEnv:
  """Paths of the serving venv: the interpreter, tritonserver, backends and shared libraries."""
  venv: str
  python: str
  site_packages: str
  tritonserver: str
  backend_dir: str
  lib_dirs: tuple[str, ...]
  perf_analyzer: str

  @classmethod
  def find(cls, venv: str | None = None) -> "ServingEnv":
    venv = _serving_venv_dir(venv)
    fix = "build it with scripts/setup_serving_env.sh"
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
      raise ServingEnvError(f"serving venv {venv} does not exist; {fix}")
    sites = sorted(glob.glob(os.path.join(venv, "lib", "python*", "site-packages")))
    if not sites:
      raise ServingEnvError(f"{venv} has no site-packages; {fix}")
    site = sites[-1]
    server = os.path.join(site, "pytriton", "tritonserver", "bin", "tritonserver")
    backends = os.path.join(venv, "triton", "backends")
    for path, what in ((server, "tritonserver (nvidia-pytriton)"),
                       (os.path.join(backends, "python", "triton_python_backend_stub"),
                        "the python backend stub")):
      if not os.path.isfile(path):
        raise ServingEnvError(f"{what} not found at {path}; {fix}")
    libdir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # LIBDIR first: otherwise Debian's libpython3.11 is found instead of the venv's interpreter's,
    # and python models that use multiprocessing break.
    libs = (libdir, os.path.join(site, "nvidia_pytriton.libs"), os.path.join(venv, "triton", "lib"))
    return cls(venv, python, site, server, backends, libs,
               os.path.join(venv, "bin", "perf_analyzer"))

  def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.lib_dirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([os.path.join(self.venv, "bin"), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


def servable_models(repo_dir: str, backend_dir: str) -> list[str]:
  """Models this server can load: those whose backend is present (NAME_onnx needs the onnxruntime
  backend, absent from the pytriton build), plus ensembles whose steps are all servable."""
  configs = validate_repository(repo_dir)
  have = set(os.listdir(backend_dir)) if os.path.isdir(backend_dir) else set()
  platform_backend = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt",
                      "pytorch_libtorch": "pytorch", "tensorflow_savedmodel": "tensorflow"}
  ok = {n for n, c in configs.items()
        if c.platform != "ensemble" and (c.backend or platform_backend.get(c.platform, "")) in have}
  for n, c in configs.items():
    if c.platform == "ensemble" and all(s.model_name in ok for s in c.ensemble_scheduling.step):
      ok.add(n)
  return sorted(ok)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def server_command(env: ServingEnv, repo_dir: str, *, http_port: int, grpc_port: int,
                   metrics_port: int, models: Sequence[str] | None = None,
                   poll_secs: int | None = None, address: str = "127.0.0.1",
                   extra: Sequence[str] = ()) -> list[str]:
  cmd = [env.tritonserver, f"--model-repository={os.path.abspath(repo_dir)}",
         f"--backend-directory={env.backend_dir}", f"--http-port={http_port}",
         f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false",
         f"--http-address={address}", f"--grpc-address={address}"]
  if poll_secs:
    # Poll mode loads every model in the repository: one it cannot load (NAME_onnx here) must not
    # stop the server or make it unready.
    cmd += ["--model-control-mode=poll", f"--repository-poll-secs={poll_secs}",
            "--exit-on-error=false", "--strict-readiness=false"]
  else:
    cmd += ["--model-control-mode=explicit"]
    cmd += [f"--load-model={m}" for m in (models if models is not None
                                          else servable_models(repo_dir, env.backend_dir))]
  return [*cmd, *extra]


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
  req = urllib.request.Request(url, data=body, method=method)
  if body is not None:
    req.add_header("Content-Type", "application/json")
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _base(url: str) -> str:
  return url if url.startswith("http") else f"http://{url}"


def reload_models(url: str, names: Sequence[str], timeout: float = 120) -> None:
  """Loads (or reloads, re-reading config.pbtxt) models through the repository API, in order.
  Blocks until each is loaded; raises TritonServerError with the server's message otherwise."""
  for name in names:
    status, body = _http("POST", f"{_base(url)}/v2/repository/models/{name}/load", b"{}", timeout)
    if status != 200:
      raise TritonServerError(f"loading {name} on {url} failed ({status}): "
                              f"{body.decode(errors='replace')}")


def wait_unloaded(url: str, model: str, version: int, timeout: float = 120) -> None:
  """Blocks until `model` `version` is no longer READY (Triton unloads a version only after its
  in-flight requests have completed)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not any(e.get("name") == model and str(e.get("version")) == str(version)
               and e.get("state") == "READY" for e in repository_index(url)):
      return
    time.sleep(0.05)
  raise TritonServerError(f"{model} version {version} still loaded after {timeout:.0f}s")


def repository_index(url: str) -> list[dict[str, Any]]:
  status, body = _http("POST", f"{_base(url)}/v2/repository/index", b"{}")
  if status != 200:
    raise TritonServerError(f"repository index on {url} failed ({status}): {body!r}")
  return json.loads(body)


class TritonServer:
  """A real tritonserver process on free local ports. Use as a context manager."""

  def __init__(self, repo_dir: str, *, env: ServingEnv | None = None,
               models: Sequence[str] | None = None, http_port: int = 0, grpc_port: int = 0,
               metrics_port: int = 0, poll_secs: int | None = None, log_path: str | None = None,
               extra_args: Sequence[str] = ()):
    self.repo_dir = os.path.abspath(repo_dir)
    self.env = env or ServingEnv.find()
    self.models = list(models) if models is not None else servable_models(repo_dir,
                                                                           self.env.backend_dir)
    self.http_port = http_port or free_port()
    self.grpc_port = grpc_port or free_port()
    self.metrics_port = metrics_port or free_port()
    self.poll_secs = poll_secs
    # Not inside the repository: Triton would not mind, but it is the users' tree.
    self.log_path = log_path or os.path.join(tempfile.gettempdir(),
                                             f"jaxclf-tritonserver-{self.http_port}.log")
    self.extra_args = list(extra_args)
    self.proc: subprocess.Popen | None = None

  @property
  def http_url(self) -> str:
    return f"127.0.0.1:{self.http_port}"

  @property
  def grpc_url(self) -> str:
    return f"127.0.0.1:{self.grpc_port}"

  @property
  def metrics_url(self) -> str:
    return f"http://127.0.0.1:{self.metrics_port}/metrics"

  def command(self) -> list[str]:
    return server_command(self.env, self.repo_dir, http_port=self.http_port,
                          grpc_port=self.grpc_port, metrics_port=self.metrics_port,
                          models=self.models, poll_secs=self.poll_secs, extra=self.extra_args)

  def start(self, timeout: float = 90) -> "TritonServer":
    self._log = open(self.log_path, "wb")
    self.proc = subprocess.Popen(self.command(), env=self.env.environ(), stdout=self._log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise TritonServerError(f"tritonserver exited with {self.proc.returncode} while starting:\n"
                                f"{self.log_tail()}")
      if self.ready():
        return self
      time.sleep(0.1)
    self.stop()
    raise TritonServerError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

  def ready(self) -> bool:
    try:
      status, _ = _http("GET", f"http://{self.http_url}/v2/health/ready", timeout=2)
    except OSError:
      return False
    if status != 200:
      return False
    return all(self.model_ready(m) for m in self.models) if not self.poll_secs else True

  def model_ready(self, model: str) -> bool:
    try:
      return _http("GET", f"http://{self.http_url}/v2/models/{model}/ready", timeout=2)[0] == 200
    except OSError:
      return False

  def log_tail(self, chars: int = 4000) -> str:
    try:
      with open(self.log_path, "rb") as f:
        return f.read().decode(errors="replace")[-chars:]
    except OSError:
      return "(no log)"

  def stop(self, timeout: float = 20) -> int | None:
    if self.proc is None:
      return None
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its stubs
        self.proc.wait(5)
    self._log.close()
    return self.proc.returncode

  def __enter__(self) -> "TritonServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
  """python -m jaxclf.export.triton {serve,write,check} ... (scripts/start_tritonserver.sh)."""
  p = argparse.ArgumentParser(prog="python -m jaxclf.export.triton")
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("serve", help="run tritonserver on a model repository (foreground)")
  s.add_argument("repository")
  s.add_argument("--http-port", type=int, default=8000)
  s.add_argument("--grpc-port", type=int, default=8001)
  s.add_argument("--metrics-port", type=int, default=8002)
  s.add_argument("--models", nargs="*", help="models to load (default: all servable here)")
  s.add_argument("--poll-secs", type=int, default=0,
                 help="poll mode: reload changed models every N s (default: explicit mode)")
  s.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0: all interfaces)")
  s.add_argument("--venv", help="serving venv (default: $JAXCLF_SERVING_VENV or .venv-serve)")
  s.add_argument("--print-command", action="store_true")
  s.add_argument("extra", nargs="*", help="extra tritonserver flags after --")
  w = sub.add_parser("write", help="write an export into a model repository")
  w.add_argument("export_dir")
  w.add_argument("repository")
  w.add_argument("--name", required=True)
  w.add_argument("--version", type=int, default=1)
  w.add_argument("--no-gpu", action="store_true", help="leave out NAME_onnx")
  c = sub.add_parser("check", help="parse and cross-check every config.pbtxt")
  c.add_argument("repository")
  args = p.parse_args(argv)
  try:
    if args.cmd == "write":
      out = write_model_repository(args.export_dir, args.repository, args.name, args.version,
                                   ServingOptions(gpu=not args.no_gpu))
      print(json.dumps(out, indent=2))
      return 0
    if args.cmd == "check":
      env = ServingEnv.find()
      configs = validate_repository(args.repository)
      print(json.dumps({"models": sorted(configs),
                        "servable_here": servable_models(args.repository, env.backend_dir)}, indent=2))
      return 0
    env = ServingEnv.find(args.venv)
    cmd = server_command(env, args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, models=args.models,
                         poll_secs=args.poll_secs or None, address=args.address,
                         extra=args.extra)
    if args.print_command:
      print(" ".join(cmd))
      return 0
    os.execve(cmd[0], cmd, env.environ())  # the server takes this process: signals reach it
  except (TritonConfigError, ServingEnvError, TritonServerError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
