"""What the served traffic looks like, and how far it has drifted from the training data.

Per request the gateway keeps a few numbers about the input image and the output (top-1 class,
confidence) in a rolling window, and compares their histograms with the model's
reference_stats.json by PSI. The features, bins, PSI and the file format live in the foundation
module jaxclf.data.reference_stats (export writes the reference with it); this module is the
live side: the window and its snapshot.

Alerting: PSI > 0.25 on any feature (settings.drift_threshold) sets jaxclf_drift_alert{feature} to 1;
0.1..0.25 is "watch". PSI is NaN until the window holds drift_min_samples requests, because a
histogram of a handful of requests says nothing.
"""
from __future__ import annotations

import collections
import math
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from jaxclf.data.reference_stats import (CHANNEL_VALUES, INPUT_FEATURES, InputStats,
                                         compute_reference_stats, edges_from_json,
                                         feature_columns, histogram, measure_input,
                                         population_stability_index)

__all__ = ["DriftMonitor", "InputStats", "compute_reference_stats", "measure_input",
           "population_stability_index"]


class DriftMonitor:
  """Rolling window of (input stats, top-1 class, confidence); thread-safe, cheap to update.

  Histograms and PSI are computed when asked (on a /metrics scrape or GET /v1/monitoring), not per
  request, so the hot path only appends to a deque.
  """

  def __init__(self, class_names: Sequence[str], reference: Mapping[str, Any] | None = None, *,
               window: int = 1000, threshold: float = 0.25, min_samples: int = 50,
               low_confidence_threshold: float = 0.5):
    self.class_names = list(class_names)
    self.reference = dict(reference) if reference else None
    self.window = int(window)
    self.threshold = float(threshold)
    self.min_samples = int(min_samples)
    self.low_confidence_threshold = float(low_confidence_threshold)
    self._inputs: collections.deque[InputStats] = collections.deque(maxlen=self.window)
    self._outputs: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.window)
    self._lock = threading.Lock()
    self.total = 0
    self.low_confidence_total = 0
    if self.reference is not None:
      self._check_reference()

  def _check_reference(self) -> None:
    ref = self.reference
    if not isinstance(ref.get("input", {}), Mapping) or not isinstance(ref.get("output", {}), Mapping):
      raise ValueError("reference_stats.json: 'input' and 'output' must be objects")
    dist = ref.get("output", {}).get("class_distribution")
    if dist is not None and len(dist.get("fractions", [])) != len(self.class_names):
      raise ValueError(f"reference_stats.json: class_distribution has {len(dist.get('fractions', []))} "
                       f"classes, the model has {len(self.class_names)}")

  def record(self, stats: InputStats | None, probs: np.ndarray) -> None:
    top1 = int(np.argmax(probs))
    conf = float(probs[top1])
    with self._lock:
      if stats is not None:
        self._inputs.append(stats)
      self._outputs.append((top1, conf))
      self.total += 1
      self.low_confidence_total += conf < self.low_confidence_threshold

  def reset(self, class_names: Sequence[str], reference: Mapping[str, Any] | None) -> None:
    """A new model: new classes and reference, so the old window means nothing."""
    with self._lock:
      self.class_names = list(class_names)
      self.reference = dict(reference) if reference else None
      self._inputs.clear()
      self._outputs.clear()
    if self.reference is not None:
      self._check_reference()

  def snapshot(self) -> dict[str, Any]:
    """Window summary + PSI per feature (NaN where not computable) + alert flags."""
    with self._lock:
      inputs = list(self._inputs)
      outputs = list(self._outputs)
    n_out = len(outputs)
    classes = np.fromiter((o[0] for o in outputs), np.int64, n_out)
    conf = np.fromiter((o[1] for o in outputs), np.float64, n_out)
    cols = feature_columns(inputs) if inputs else None
    ref = self.reference or {}
    psi: dict[str, float] = {}
    for name in INPUT_FEATURES:
      psi[name] = self._input_psi(name, cols, len(inputs), ref.get("input", {}).get(name))
    dist = ref.get("output", {}).get("class_distribution")
    psi["class_distribution"] = (
        population_stability_index(np.bincount(classes, minlength=len(self.class_names)),
                                   dist["fractions"])
        if dist is not None and n_out >= self.min_samples else math.nan)
    cref = ref.get("output", {}).get("confidence")
    psi["confidence"] = (population_stability_index(
        histogram(conf, edges_from_json(cref["edges"])), cref["fractions"])
        if cref is not None and n_out >= self.min_samples else math.nan)
    low_rate = float((conf < self.low_confidence_threshold).mean()) if n_out else math.nan
    alerts = {k: bool(v > self.threshold) for k, v in psi.items() if not math.isnan(v)}
    return {
        "window_size": self.window,
        "samples": n_out,
        "total_requests": self.total,
        "has_reference": self.reference is not None,
        "threshold": self.threshold,
        "min_samples": self.min_samples,
        "psi": psi,
        "alerts": alerts,
        "drift_detected": any(alerts.values()),
        "low_confidence_threshold": self.low_confidence_threshold,
        "low_confidence_rate": low_rate,
        "reference_low_confidence_rate": ref.get("output", {}).get("low_confidence_rate"),
        "input_means": ({k: float(cols[k].mean()) for k in INPUT_FEATURES} if cols else {}),
        "class_distribution": ({self.class_names[i]: float(c) / n_out for i, c in enumerate(
            np.bincount(classes, minlength=len(self.class_names)))} if n_out else {}),
        "mean_confidence": float(conf.mean()) if n_out else math.nan,
    }

  def _input_psi(self, name: str, cols, n: int, ref: Mapping[str, Any] | None) -> float:
    if ref is None or cols is None or n < self.min_samples:
      return math.nan
    if name == "channels":
      values = list(ref.get("values", CHANNEL_VALUES))
      counts = np.array([(cols["channels"] == v).sum() for v in values])
      return population_stability_index(counts, ref["fractions"])
    return population_stability_index(histogram(cols[name], edges_from_json(ref["edges"])),
                                      ref["fractions"])
