"""`jaxclf evaluate`: score a model on held-out data -> metrics.json, report.html, PNG plots.

  model:  a run directory (Orbax checkpoint: best | latest | step), an ONNX export (the export
          dir or its model.onnx), or `registry:NAME@stage` (resolved by jaxclf.registry).
  data:   'fashion_mnist' (its test split), an ingested dataset (its test split), or a
          class-per-folder directory (every image is test data; with train/ val/ test/ split
          folders, only test/).

Images go through `jaxclf.data.decode.decode_image` and `jaxclf.data.transforms.preprocess`,
the same code as training and serving. Files that cannot be decoded are skipped and listed in
metrics.json and the report; they never end the run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxclf.data import transforms
from jaxclf.data.dataset import DataError, check_classes
from jaxclf.data.decode import DecodeError, decode_image
from jaxclf.evaluate.schema import SCHEMA_VERSION, validate_metrics

# metrics (scikit-learn), plots (matplotlib), curves (tensorboard) and onnxruntime / jax are
# imported inside the functions that use them: `jaxclf --help` and the other commands, which
# import this module to register `evaluate`, should not pay seconds for them.

DEFAULT_BATCH_SIZE = 256
GALLERY_SIZE = 16


class EvaluationError(ValueError):
  """A model or data problem the user can fix; the message names the file or field."""


# ----------------------------------------------------------------------------- models

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
  opts.log_severity_level = 3  # the NCHW/NHWC "MergeShapeInfo" warning is harmless (FINDINGS)
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
  path = _resolve_registry(uri) if uri.startswith("registry:") else os.path.expanduser(uri)
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


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class TestData:
  source: str
  kind: str  # fashion_mnist | ingested | image_folder
  name: str
  version: str | None
  split: str
  class_names: list[str]
  labels: np.ndarray  # indices into class_names (the data's own classes)
  read: Callable[[int], Any]  # i -> uint8 HWC array or encoded bytes
  describe: Callable[[int], str]  # i -> a file path or 'name:test[i]'
  skipped: list[dict] = dataclasses.field(default_factory=list)
  # Position of each example in the full test set (differs from 0..N-1 after --max-examples).
  origin: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)

  def original_index(self, i: int) -> int:
    return int(self.origin[i]) if self.origin is not None else int(i)


def _data_config(test_data: str, base=None):
  """The data section used to open a dataset: the run's own (same split seed and fractions as
  training, so 'test' is the same test split) when there is one, else the defaults."""
  if base is None:
    from jaxclf.config.defaults import default_config
    base = default_config().data
  cfg = copy.deepcopy(base)
  with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
    cfg.source = test_data
    cfg.limit_per_split = 0  # the whole test split, whatever the run trained on
  return cfg


def _load_dataset_split(test_data: str, kind: str, data_cfg) -> TestData:
  from jaxclf.data.dataset import load_dataset
  ds = load_dataset(_data_config(test_data, data_cfg))
  if "test" not in ds.splits or not len(ds.split("test").labels):
    raise DataError(f"--test-data {test_data!r}: dataset {ds.name!r} has no test split "
                    f"(splits: {sorted(ds.splits)})")
  split = ds.split("test")
  src = split.source
  name = ds.name
  return TestData(test_data, kind, name, ds.version, "test", list(ds.class_names),
                  np.asarray(split.labels, np.int64), lambda i: src[int(i)]["image"],
                  lambda i: f"{name}:test[{int(i)}]")


def _load_folder(root: str, workers: int) -> TestData:
  from jaxclf.data.sources import image_folder, scan
  candidates, listing = image_folder.list_candidates(root)
  if listing.get("given_splits"):
    candidates = [c for c in candidates if c.split == "test"]
    split = "test"
    if not candidates:
      raise DataError(f"--test-data {root!r}: has split folders {listing['given_splits']} but no "
                      "test/ folder; point --test-data at the folder of test images")
  else:
    split = "all"
  if not candidates:
    raise DataError(f"--test-data {root!r}: no image files found")
  class_names = sorted({c.label_name for c in candidates})
  index = {n: i for i, n in enumerate(class_names)}
  paths = [c.uri for c in candidates]
  labels = np.array([index[c.label_name] for c in candidates], np.int64)

  # One pass of hashing fixes a content version for the report; decoding happens later.
  def sha(p):
    data, _ = scan.read_local(p)
    return hashlib.sha256(data).hexdigest() if data is not None else "unreadable"

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    shas = list(pool.map(sha, paths))
  version = scan.content_version(class_names, [(s, int(l), split) for s, l in zip(shas, labels)])

  def read(i):
    with open(paths[int(i)], "rb") as f:
      return f.read()

  return TestData(root, "image_folder", os.path.basename(os.path.normpath(root)) or root,
                  version, split, class_names, labels, read, lambda i: paths[int(i)])


def load_test_data(test_data: str, data_cfg=None, workers: int = 2) -> TestData:
  source = str(test_data)
  if source == "fashion_mnist":
    return _load_dataset_split(source, "fashion_mnist", data_cfg)
  if "://" in source and not source.startswith("file://"):
    return _load_dataset_split(source, "ingested", data_cfg)
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise DataError(f"--test-data {source!r} does not exist; give 'fashion_mnist', an ingested "
                    "dataset directory, or a class-per-folder directory of images")
  if not os.path.isdir(path):
    raise DataError(f"--test-data {source!r} is a file; give a directory or 'fashion_mnist'")
  if os.path.isfile(os.path.join(path, "manifest.json")):
    return _load_dataset_split(path, "ingested", data_cfg)
  if not any(not n.startswith(".") for n in os.listdir(path)):
    raise DataError(f"--test-data {source!r} is an empty folder; expected "
                    f"{source}/<class name>/<image files>")
  return _load_folder(path, workers)


def _name_key(name: str) -> str:
  # Folder names cannot hold '/', so 'T-shirt/top' arrives as 'T-shirt_top' or 't-shirt top'.
  return re.sub(r"[\s/\\_:-]+", "_", name.casefold()).strip("_")


def match_class_names(found: Sequence[str], model_classes: Sequence[str], source: str
                      ) -> dict[str, str]:
  """Test class name -> model class name. Exact names first; then names equal up to case and
  separators (space, '/', '_', '-', ':'), when that is unambiguous. Anything left is an error
  that lists the unknown classes and the ones the model knows."""
  exact = set(model_classes)
  by_key: dict[str, list[str]] = {}
  for m in model_classes:
    by_key.setdefault(_name_key(m), []).append(m)
  mapping, unknown = {}, []
  for name in found:
    if name in exact:
      mapping[name] = name
    elif len(by_key.get(_name_key(name), [])) == 1:
      mapping[name] = by_key[_name_key(name)][0]
    else:
      unknown.append(name)
  if unknown:
    check_classes(unknown, model_classes, f"--test-data {source!r}")  # raises, listing them
  return mapping


def model_labels(data: TestData, model: LoadedModel) -> tuple[np.ndarray, dict[str, str]]:
  """The data's labels as model class indices, and the names that were matched loosely."""
  mapping = match_class_names(data.class_names, model.class_names, data.source)
  to_model = np.array([model.class_names.index(mapping[n]) for n in data.class_names], np.int64)
  renamed = {k: v for k, v in mapping.items() if k != v}
  return to_model[data.labels], renamed


# ----------------------------------------------------------------------------- prediction

def _to_pixels(record: Any, spec: transforms.PreprocessSpec, where: str) -> np.ndarray:
  if isinstance(record, (bytes, bytearray, memoryview)):
    return decode_image(bytes(record), spec.channels, background=spec.background, source=where)
  return np.asarray(record, np.uint8)


def predict(model: LoadedModel, data: TestData, batch_size: int = DEFAULT_BATCH_SIZE,
            workers: int = 2, progress: Callable[[int, int], None] | None = None
            ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
  """-> (logits for the kept examples, their indices into `data`, skipped files)."""
  spec = model.spec

  def prepare(i):
    where = data.describe(i)
    try:
      return transforms.preprocess(_to_pixels(data.read(i), spec, where), spec), None
    except DecodeError as e:
      return None, e.as_dict()
    except (OSError, ValueError) as e:  # an unreadable file or an unmappable image is a skip too
      return None, {"source": where, "stage": "read", "reason": f"{type(e).__name__}: {e}"}

  outs, kept, skipped = [], [], []
  n = len(data)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, n, batch_size):
      idx = range(start, min(start + batch_size, n))
      batch = []
      for i, (x, err) in zip(idx, pool.map(prepare, idx)):
        if err is None:
          batch.append(x)
          kept.append(i)
        else:
          skipped.append(err)
      if batch:
        outs.append(np.asarray(model.logits(np.stack(batch)), np.float32))
      if progress:
        progress(min(start + batch_size, n), n)
  k = len(model.class_names)
  logits = np.concatenate(outs) if outs else np.zeros((0, k), np.float32)
  return logits, np.asarray(kept, np.int64), skipped


# ----------------------------------------------------------------------------- calibration

def _mean_nll(probs: np.ndarray, y: np.ndarray) -> float:
  p = np.clip(probs[np.arange(len(y)), y], 1e-15, 1.0)
  return float(-np.log(p).mean())


def temperature_scaling(model: LoadedModel, y: np.ndarray, logits: np.ndarray,
                        test: dict[str, Any]) -> dict[str, Any]:
  """metrics.json test.temperature_scaling: ECE / NLL with and without the model's temperature.

  Both loaders return calibrated logits (raw / T): the ONNX graph has the division baked in and
  `load_inference` divides. The figures "before" undo it (logits x T = the network's raw logits);
  "after" are the figures of the rest of metrics.json (the calibrated model, as served).
  """
  from jaxclf.evaluate import metrics as metrics_lib
  t = float(model.spec.temperature)
  y = np.asarray(y, np.int64)
  after = test["calibration"]
  after_probs = metrics_lib.softmax(logits)
  raw_probs = metrics_lib.softmax(np.asarray(logits, np.float64) * t) if t != 1.0 else after_probs
  before = metrics_lib.top1_calibration(y, raw_probs, after["n_bins"]) if t != 1.0 else after
  return {
      "temperature": t,
      "calibrated": t != 1.0,
      "applied_by": (None if t == 1.0 else "the ONNX graph (logits / T)" if model.format == "onnx"
                     else "the checkpoint loader (load_inference: logits / T)"),
      "ece_before": before["ece"], "ece_after": after["ece"],
      "mce_before": before["mce"], "mce_after": after["mce"],
      "mean_confidence_before": before["mean_confidence"],
      "mean_confidence_after": after["mean_confidence"],
      "nll_before": _mean_nll(raw_probs, y), "nll_after": _mean_nll(after_probs, y),
  }


# ----------------------------------------------------------------------------- orchestration

@dataclasses.dataclass
class Evaluation:
  out_dir: str
  metrics_path: str
  report_path: str
  doc: dict
  # Per-example results behind the figures (not written to disk): the model's logits (already
  # calibrated: raw / temperature), the model-class labels, and each row's position in the full
  # test data (as metrics.json's example indices: unchanged by --max-examples).
  logits: np.ndarray | None = None
  labels: np.ndarray | None = None
  example_index: np.ndarray | None = None


def default_out_dir(model: LoadedModel, data: TestData) -> str:
  tag = f"{data.name}-{data.split}".replace(os.sep, "_")
  if model.run_dir and model.format == "checkpoint":
    return os.path.join(model.run_dir, "eval", f"{model.checkpoint}-step{model.step}-{tag}")
  name = os.path.basename(os.path.dirname(os.path.abspath(model.path))) or "model"
  return os.path.join("eval", f"{name}-{tag}")


def _selection_note(model: LoadedModel) -> str:
  how = (f"The weights were selected by {model.selected_by}"
         if model.selected_by else "The weights were fixed before this evaluation")
  return (f"The test split was never used for model selection or early stopping. {how}; the "
          "figures in this report were computed afterwards, once, on held-out test data. "
          "Validation figures (which did steer training) are reported separately.")


def _gallery(model: LoadedModel, data: TestData, kept: np.ndarray,
             wrong: list[dict]) -> tuple[bytes | None, list[dict]]:
  from jaxclf.evaluate import plots
  images, captions = [], []
  names = model.class_names
  for w in wrong:
    i = int(kept[w["index"]])
    w["index"] = data.original_index(i)  # an index into the full test set, as the schema says
    w["source"] = data.describe(i)
    w["true"], w["predicted"] = names[w["true_index"]], names[w["predicted_index"]]
    try:
      pixels = _to_pixels(data.read(i), model.spec, w["source"])
    except (DecodeError, OSError, ValueError):
      continue
    images.append(transforms.resize_and_center_crop(pixels, model.spec))
    captions.append(f"true: {w['true'][:16]}\npred: {w['predicted'][:16]} "
                    f"({100 * w['confidence']:.0f}%)")
  return plots.error_gallery_png(images, captions), wrong


def _write_json(path: str, doc: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _run_data_config(model: LoadedModel):
  """The data section of the model's training run (same split seed and fractions, so an
  ingested or folder dataset yields the same test split it was trained beside), or None."""
  cfg_path = os.path.join(model.run_dir, "config.json") if model.run_dir else ""
  if not os.path.isfile(cfg_path):
    return None
  import ml_collections
  with open(cfg_path) as f:
    return ml_collections.ConfigDict(json.load(f)).get("data")


def _subset(data: TestData, labels: np.ndarray, max_examples: int, seed: int
            ) -> tuple[TestData, np.ndarray]:
  """A seeded random subset (not the first N: folder records are ordered by class)."""
  if not max_examples or len(data) <= max_examples:
    return data, labels
  subset = np.sort(np.random.default_rng(seed).permutation(len(data))[:max_examples])
  read, describe = data.read, data.describe
  data = dataclasses.replace(data, labels=data.labels[subset],
                             read=lambda i: read(subset[int(i)]),
                             describe=lambda i: describe(subset[int(i)]), origin=subset)
  return data, labels[subset]


def _render_plots(model: LoadedModel, data: TestData, kept: np.ndarray, test: dict,
                  run_curves: dict) -> dict[str, bytes | None]:
  from jaxclf.evaluate import plots
  gallery, test["most_confidently_wrong"] = _gallery(model, data, kept,
                                                     test["most_confidently_wrong"])
  cm = test["confusion_matrix"]
  return {
      "confusion_matrix": plots.confusion_matrix_png(cm["counts"], cm["normalized"],
                                                     model.class_names),
      "reliability": plots.reliability_png(test["calibration"]),
      "per_class_f1": plots.per_class_f1_png(test["per_class"]),
      "curves": plots.curves_png(run_curves, model.step),
      "error_gallery": gallery,
  }


def _document(model: LoadedModel, data: TestData, test: dict, val: dict | None,
              skipped: list[dict], renamed: dict[str, str], artifacts: dict[str, str],
              timing: dict[str, float]) -> dict[str, Any]:
  present = {c["index"] for c in test["per_class"] if c["support"] > 0}
  return {
      "schema_version": SCHEMA_VERSION,
      "kind": "jaxclf.evaluation",
      "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "split": "test",
      "model": {"uri": model.uri, "format": model.format, "path": model.path,
                "run_dir": model.run_dir, "checkpoint": model.checkpoint, "step": model.step,
                "architecture": model.architecture, "sha256": model.sha256,
                "input_shape": list(model.spec.input_shape), "class_names": model.class_names},
      "data": {"source": data.source, "kind": data.kind, "name": data.name,
               "version": data.version, "split": data.split,
               "num_examples": test["num_examples"], "class_names": data.class_names,
               "renamed_classes": renamed,
               "classes_without_examples": [c for i, c in enumerate(model.class_names)
                                            if i not in present],
               "skipped": skipped},
      "preprocessing": model.spec.to_dict(),
      "test": test,
      "val": val,
      "model_selection": {"test_used_for_selection": False, "selected_by": model.selected_by,
                          "note": _selection_note(model)},
      "artifacts": artifacts,
      "timing": timing,
  }


def evaluate_model(model_path: str, test_data: str, out_dir: str | None = None, *,
                   which: str | int = "best", batch_size: int = DEFAULT_BATCH_SIZE,
                   max_examples: int = 0, seed: int = 0, bootstrap_resamples: int = 1000,
                   workers: int = 2, tensorboard: bool = True, allow_unverified: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Evaluation:
  """Scores `model_path` on `test_data`; writes metrics.json, report.html, PNG plots and
  TensorBoard images (<out>/tb) to out_dir (default: see `default_out_dir`).

  `max_examples` > 0 scores a seeded random subset (smoke tests); 0 scores everything.
  Raises EvaluationError (model problems) or DataError (data problems) with the file or field.
  """
  from jaxclf.evaluate import curves as curves_lib
  from jaxclf.evaluate import metrics as metrics_lib
  from jaxclf.evaluate import plots, report

  t0 = time.perf_counter()
  model = load_model(model_path, which, batch_size, allow_unverified=allow_unverified)
  data = load_test_data(test_data, _run_data_config(model), workers=workers)
  labels, renamed = model_labels(data, model)
  data, labels = _subset(data, labels, max_examples, seed)

  t_pred = time.perf_counter()
  logits, kept, skipped = predict(model, data, batch_size, workers, progress)
  predict_s = time.perf_counter() - t_pred
  skipped = data.skipped + skipped
  if not len(kept):
    first = "; ".join(f"{s.get('source')}: {s['reason']}" for s in skipped[:3])
    raise DataError(f"--test-data {data.source!r}: none of the {len(data)} images could be "
                    f"decoded ({first})")
  test = metrics_lib.compute_metrics(labels[kept], metrics_lib.softmax(logits),
                                     model.class_names, n_wrong=GALLERY_SIZE, seed=seed,
                                     n_resamples=bootstrap_resamples)
  test["temperature_scaling"] = temperature_scaling(model, labels[kept], logits, test)

  out_dir = os.path.abspath(out_dir or default_out_dir(model, data))
  os.makedirs(out_dir, exist_ok=True)
  run_curves = curves_lib.read_run_curves(model.run_dir) if model.run_dir else {}
  pngs = _render_plots(model, data, kept, test, run_curves)
  artifacts = {"metrics": "metrics.json", "report": "report.html"}
  for key, png in pngs.items():
    if png:
      artifacts[key] = f"{key}.png"
      with open(os.path.join(out_dir, artifacts[key]), "wb") as f:
        f.write(png)
  if tensorboard:
    plots.write_tensorboard_images(
        os.path.join(out_dir, "tb"),
        {f"evaluate/{k}": pngs[k] for k in ("confusion_matrix", "curves", "reliability")},
        step=model.step or 0)
    artifacts["tensorboard"] = "tb"

  timing = {"total_s": round(time.perf_counter() - t0, 3), "predict_s": round(predict_s, 3),
            "images_per_s": round(len(data) / max(predict_s, 1e-9), 1)}
  doc = _document(model, data, test, curves_lib.val_metrics_at(run_curves, model.step),
                  skipped, renamed, artifacts, timing)
  validate_metrics(doc)  # the file we write always matches its published schema
  metrics_path = os.path.join(out_dir, "metrics.json")
  report_path = os.path.join(out_dir, "report.html")
  _write_json(metrics_path, doc)
  report.write_report(report_path, doc, pngs)
  return Evaluation(out_dir, metrics_path, report_path, doc, logits=logits,
                    labels=labels[kept],
                    example_index=np.array([data.original_index(i) for i in kept], np.int64))


# ----------------------------------------------------------------------------- CLI

def _checkpoint_arg(value: str) -> str | int:
  if value in ("best", "latest"):
    return value
  if value.isdigit():
    return int(value)
  raise argparse.ArgumentTypeError(f"--checkpoint must be best, latest or a step number, got {value!r}")


def add_evaluate_command(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "evaluate", help="score a model on held-out data: metrics.json + report.html",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--model-path", required=True,
                 help="run dir, ONNX export dir or model.onnx, or registry:NAME@stage")
  p.add_argument("--test-data", required=True,
                 help="'fashion_mnist', an ingested dataset dir, or a class-per-folder dir")
  p.add_argument("--out", default=None,
                 help="output dir (default: <run>/eval/<ckpt>-step<N>-<data> or ./eval/<export>-<data>)")
  p.add_argument("--checkpoint", type=_checkpoint_arg, default="best",
                 help="best (default) | latest | a step number (run dirs only)")
  p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  p.add_argument("--max-examples", type=int, default=0,
                 help="score a seeded random subset of this size (0 = all)")
  p.add_argument("--seed", type=int, default=0, help="bootstrap and subset seed")
  p.add_argument("--allow-unverified", action="store_true",
                 help="score an ONNX model that has no recorded sha256 (export.json / version.json)")
  p.set_defaults(func=run_evaluate_command)
  return p


def run_evaluate_command(args) -> int:
  def progress(done, total):
    if sys.stderr.isatty():
      print(f"\revaluating {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

  try:
    ev = evaluate_model(args.model_path, args.test_data, args.out, which=args.checkpoint,
                        batch_size=args.batch_size, max_examples=args.max_examples,
                        seed=args.seed, allow_unverified=args.allow_unverified,
                        progress=progress)
  except (EvaluationError, DataError) as e:
    print(f"jaxclf evaluate: error: {e}", file=sys.stderr)
    return 2
  t = ev.doc["test"]
  ci = t["confidence_intervals"]
  print(json.dumps({
      "split": "test", "examples": t["num_examples"], "skipped": len(ev.doc["data"]["skipped"]),
      "accuracy": round(t["accuracy"], 4),
      "accuracy_ci95": [round(ci["accuracy"]["low"], 4), round(ci["accuracy"]["high"], 4)],
      "macro_f1": round(t["macro"]["f1"], 4), "ece": round(t["calibration"]["ece"], 4),
      "ece_before_calibration": round(t["temperature_scaling"]["ece_before"], 4),
      "temperature": t["temperature_scaling"]["temperature"],
      "metrics": ev.metrics_path, "report": ev.report_path}))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxclf.evaluate.evaluate")
  sub = parser.add_subparsers(dest="command", required=True)
  add_evaluate_command(sub)
  args = parser.parse_args(["evaluate", *(sys.argv[1:] if argv is None else argv)])
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
