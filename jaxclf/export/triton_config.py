"""Triton model configs for an export: the one source of truth, config.pbtxt, and their checks.

`model_configs()` returns plain dicts, one per model; they become config.pbtxt through Triton's
own `ModelConfig` protobuf (shipped in tritonclient), so a config that does not parse against
Triton's schema is never written. For export NAME, registry version V:

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

This module imports neither jax nor onnx: it runs in both the training and the serving venv.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import os
from typing import Any, Mapping, Sequence

from jaxclf.artifacts import RAW_MODEL_FILE
from jaxclf.export.serving_env import ServingEnvError, serving_venv_dir

ENSEMBLE_INPUT = "image"
ENSEMBLE_OUTPUTS = ("probabilities", "top_labels", "top_scores")
# model_raw.onnx's tensor names (jaxclf.export.onnx RAW_INPUT_NAME / OUTPUT_NAME; this module does
# not import the exporter at load time): the standard interface of NAME and NAME_onnx.
CLASSIFIER_INPUT, CLASSIFIER_OUTPUT = "pixels", "logits"
POSTPROCESS_OUTPUTS = ("probabilities", "top_scores", "top_indices", "top_labels")


class TritonConfigError(RuntimeError):
  """A model configuration that Triton's schema rejects, or a repository that cannot be written."""


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


def _gpu_config(model: str, o: ServingOptions, hwc: list[int], pinned: dict[str, Any],
                pixels_in: list[dict[str, Any]],
                logits_out: list[dict[str, Any]]) -> dict[str, Any]:
  """NAME_onnx: the ORT platform on GPU instances, dynamic batching, warmup, TensorRT."""
  gpu: dict[str, Any] = {
      "name": model, "platform": "onnxruntime_onnx", "max_batch_size": o.max_batch_size,
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
                       "trt_engine_cache_path": os.path.join(o.tensorrt_cache_dir, model)},
    }]}}
  return gpu


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
    configs[n["onnx"]] = _gpu_config(n["onnx"], o, hwc, pinned, pixels_in, logits_out)
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
  venv = serving_venv_dir()
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
