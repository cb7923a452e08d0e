"""The model `jaxclf evaluate` scores, loaded from any of the forms a user names it by.

  a run directory      its Orbax checkpoint (best | latest | step), through
                       jaxclf.train.checkpoints.load_inference, fed fixed-size batches
  an ONNX export       the export dir or its model.onnx: the bytes scored are the bytes whose
                       sha256 the export recorded (jaxclf.integrity), checked against
                       preprocessing.json, labels.txt and export.json
  registry:NAME@stage  resolved by jaxclf.registry; models:/NAME@alias by MLflow's registry

Either way the result is a `LoadedModel` whose `logits` take preprocessed float32 NHWC images and
return calibrated logits (raw / T). onnxruntime and jax are imported only by the loader that needs
them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from jaxclf.data import transforms

DEFAULT_BATCH_SIZE = 256


class EvaluationError(ValueError):
  """A model or data problem the user can fix; the message names the file or field."""


@dataclasses.dataclass
class LoadedModel:
  uri: str
  format: str  # 'checkpoint' | 'onnx'
  path: str
  spec: transforms.PreprocessSpec
  logits: Callable[[np.ndarray], np.ndarray]  # float32 NHWC preprocessed -> (N, K) logits
  run_dir: str | None = None
  checkpoint: str | None = None
  step: int | None = None
  architecture: str | None = None
  sha256: str | None = None
  selected_by: str | None = None

  @property
  def class_names(self) -> list[str]:
    return list(self.spec.class_names)


def _resolve_registry(uri: str) -> str:
  try:
    import jaxclf.registry as registry
    resolve = registry.resolve_model_uri
  except (ImportError, AttributeError) as e:
    raise EvaluationError(f"--model-path {uri!r}: registry URIs need jaxclf.registry."
                          f"resolve_model_uri, which this installation lacks ({e})") from None
  # The registry's own errors (unknown name/stage, a tampered artefact) become one-line errors.
  known = tuple(getattr(registry, n) for n in ("RegistryError", "IntegrityError")
                if isinstance(getattr(registry, n, None), type))
  try:
    return resolve(uri)
  except known as e:
    raise EvaluationError(f"--model-path {uri!r}: {e}") from None


def _resolve_mlflow(uri: str) -> str:
  """models:/NAME@alias | models:/NAME/N -> the downloaded, sha256-checked export dir."""
  from jaxclf.tracking.model_registry import MlflowRegistryError, download_model  # needs mlflow
  try:
    return download_model(uri)
  except MlflowRegistryError as e:
    raise EvaluationError(f"--model-path {e}") from None


def _load_onnx(uri: str, onnx_path: str, allow_unverified: bool = False) -> LoadedModel:
  export_dir = os.path.dirname(os.path.abspath(onnx_path))
  spec_path = os.path.join(export_dir, "preprocessing.json")
  if not os.path.isfile(spec_path):
    raise EvaluationError(f"{export_dir}: an ONNX export needs preprocessing.json beside "
                          "model.onnx (the preprocessing spec); re-export with `jaxclf export`")
  with open(spec_path) as f:
    try:
      spec = transforms.PreprocessSpec.from_json(f.read())
    except (ValueError, TypeError) as e:
      raise EvaluationError(f"{spec_path}: invalid preprocessing spec ({e})") from None
  labels_path = os.path.join(export_dir, "labels.txt")
  if os.path.isfile(labels_path):
    with open(labels_path, encoding="utf-8") as f:
      labels = [line.rstrip("\n") for line in f if line.strip()]
    if spec.class_names and labels != list(spec.class_names):
      raise EvaluationError(f"{export_dir}: labels.txt ({len(labels)} classes) disagrees with "
                            f"preprocessing.json class_names ({len(spec.class_names)})")
    if not spec.class_names:
      spec = dataclasses.replace(spec, class_names=tuple(labels))

  import onnxruntime as ort
  from jaxclf.integrity import IntegrityError, read_verified
  try:  # the bytes that are scored are the bytes that were hashed (no reopen by path)
    model_bytes, model_sha = read_verified(onnx_path, allow_unverified=allow_unverified)
  except IntegrityError as e:
    raise EvaluationError(str(e)) from None
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
  opts.log_severity_level = 3  # the NCHW/NHWC "MergeShapeInfo" warning is harmless
  try:
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own exception types for a bad graph
    raise EvaluationError(f"{onnx_path}: onnxruntime cannot load it ({e})") from None
  inp = session.get_inputs()[0]
  out_name = session.get_outputs()[0].name
  declared = list(inp.shape[1:])
  fixed = [(d, s) for d, s in zip(declared, spec.input_shape) if isinstance(d, int)]
  if len(declared) != 3 or any(d != s for d, s in fixed):
    raise EvaluationError(
        f"{onnx_path}: the graph's input {inp.name!r} is {inp.shape}, but preprocessing.json says "
        f"images are (N, {', '.join(map(str, spec.input_shape))}) NHWC; the export is inconsistent")

  def logits(x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([out_name], {inp.name: np.ascontiguousarray(x, np.float32)})[0])

  # export.json (jaxclf.export.onnx) links the export to its training run, when it has one.
  meta: dict[str, Any] = {}
  meta_path = os.path.join(export_dir, "export.json")
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  recorded_t = (meta.get("calibration") or {}).get("temperature")
  if recorded_t is not None and abs(float(recorded_t) - spec.temperature) > 1e-9 * max(1.0, spec.temperature):
    raise EvaluationError(f"{export_dir}: export.json says the graph applies temperature "
                          f"{recorded_t} but preprocessing.json says {spec.temperature}; the "
                          "export is inconsistent (re-export with `jaxclf export`)")
  source = meta.get("source") or {}
  run_dir = source.get("run_dir")
  step = source.get("checkpoint_step")
  which = source.get("checkpoint")
  selected = None
  if which == "best":
    selected = "validation split, best checkpoint of the source run (before export)"
  elif which is not None:
    selected = f"none: the {which} checkpoint of the source run"
  return LoadedModel(uri, "onnx", onnx_path, spec, logits,
                     run_dir=run_dir if run_dir and os.path.isdir(run_dir) else None,
                     checkpoint=str(which) if which is not None else None,
                     step=int(step) if step is not None else None,
                     architecture=(meta.get("model") or {}).get("name"),
                     sha256=model_sha, selected_by=selected)


def _fixed_batch(fn: Callable[..., np.ndarray], batch: int) -> Callable[[np.ndarray], np.ndarray]:
  """Feeds `fn` only full batches (zero-padded): one input shape means one XLA compilation,
  instead of one per distinct batch length (seconds each on a small CPU)."""
  def logits(x: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
      chunk = x[i:i + batch]
      n = len(chunk)
      if n < batch:
        chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.asarray(fn(chunk, batch_size=batch))[:n])
    return np.concatenate(out)
  return logits


def _load_checkpoint(uri: str, run_dir: str, which: str | int, batch_size: int) -> LoadedModel:
  from jaxclf.train.checkpoints import load_inference  # jax/orbax only when needed
  try:
    inf = load_inference(run_dir, which=which)
  except FileNotFoundError as e:
    raise EvaluationError(str(e)) from None
  except ValueError as e:
    # Orbax refuses to restore weights whose shapes differ from the model the run's config and
    # preprocessing.json describe (e.g. preprocessing.json edited to 3 channels).
    spec = _read_run_spec(run_dir)
    shape = "x".join(map(str, spec.input_shape)) if spec else "?"
    first = str(e).strip().splitlines()[0][:300]
    raise EvaluationError(
        f"{run_dir}: the checkpoint does not fit the model described by its config.json and "
        f"preprocessing.json (input {shape} HxWxC, {len(spec.class_names) if spec else '?'} "
        f"classes): {first}") from None
  metric = None
  try:
    metric = str(inf.config.early_stopping.metric)
  except AttributeError:
    pass
  kind = getattr(inf, "which", str(which))
  selected = (f"validation split ({metric or 'val_accuracy'}), best checkpoint"
              if kind == "best" else "none: the latest checkpoint, whatever its score")
  try:
    arch = str(inf.config.model.name)
  except AttributeError:
    arch = None
  return LoadedModel(uri, "checkpoint", os.path.abspath(run_dir), inf.spec,
                     _fixed_batch(inf.logits, batch_size),
                     run_dir=os.path.abspath(run_dir), checkpoint=str(kind), step=int(inf.step),
                     architecture=arch, selected_by=selected)


def _read_run_spec(run_dir: str) -> transforms.PreprocessSpec | None:
  try:
    with open(os.path.join(run_dir, "preprocessing.json")) as f:
      return transforms.PreprocessSpec.from_json(f.read())
  except (OSError, ValueError, TypeError):
    return None


def check_model_fits_spec(model: LoadedModel) -> None:
  """Runs one blank input of the spec's shape; a model whose weights disagree with its own
  preprocessing spec (channels, size) fails here with a clear message, before any data is read."""
  if not model.class_names:
    raise EvaluationError(f"{model.uri}: the model's preprocessing spec lists no class names")
  probe = np.zeros((1, *model.spec.input_shape), np.float32)
  try:
    out = np.asarray(model.logits(probe))
  except Exception as e:  # jax/onnxruntime raise many types for a shape clash
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise EvaluationError(
        f"{model.uri}: its preprocessing spec says inputs are "
        f"{'x'.join(map(str, model.spec.input_shape))} (HxWxC), but the model rejects an input "
        f"of that shape: {type(e).__name__}: {first[:300]}") from None
  if out.shape != (1, len(model.class_names)):
    raise EvaluationError(f"{model.uri}: the model outputs {out.shape[1:]} scores per image but "
                          f"its spec names {len(model.class_names)} classes")


def load_model(model_path: str, which: str | int = "best",
               batch_size: int = DEFAULT_BATCH_SIZE, *, allow_unverified: bool = False) -> LoadedModel:
  """A run dir, an ONNX export (its model.onnx checked against the recorded sha256, refused
  without one unless `allow_unverified`) or a registry URI -> LoadedModel."""
  uri = str(model_path)
  path = (_resolve_registry(uri) if uri.startswith("registry:") else
          _resolve_mlflow(uri) if uri.startswith("models:/") else os.path.expanduser(uri))
  if not os.path.exists(path):
    raise EvaluationError(f"--model-path {uri!r}: {path} does not exist")
  if os.path.isfile(path):
    if not path.endswith(".onnx"):
      raise EvaluationError(f"--model-path {uri!r}: a file must be an ONNX model (.onnx)")
    model = _load_onnx(uri, path, allow_unverified)
  elif os.path.isfile(os.path.join(path, "model.onnx")):
    model = _load_onnx(uri, os.path.join(path, "model.onnx"), allow_unverified)
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    model = _load_checkpoint(uri, path, which, batch_size)
  else:
    raise EvaluationError(f"--model-path {uri!r}: neither a run directory (no checkpoints/) nor "
                          "an ONNX export (no model.onnx)")
  check_model_fits_spec(model)
  return model
