"""Scoring a loaded model on held-out data: the logits of every decodable example (the rest
reported as skips, never an exception that ends the run), and the temperature-scaling figures.
The metrics themselves are computed by jaxclf.evaluate.metrics.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import numpy as np

from jaxclf.data import transforms
from jaxclf.data.decode import DecodeError, decode_image
from jaxclf.evaluate.held_out import TestData
from jaxclf.evaluate.model_loader import DEFAULT_BATCH_SIZE, LoadedModel


def to_pixels(record: Any, spec: transforms.PreprocessSpec, where: str) -> np.ndarray:
  """A record as uint8 HWC pixels: encoded bytes decoded as training and serving decode them."""
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
      return transforms.preprocess(to_pixels(data.read(i), spec, where), spec), None
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
