"""What the served traffic looks like, and how far it has drifted from the training data.

Per request we keep a few numbers about the input image (size, aspect, channels, brightness,
contrast) and the output (top-1 class, confidence) in a rolling window. Drift is the population
stability index (PSI) of each feature's histogram in the window against the same histogram of the
training set, stored with the model as reference_stats.json:

  PSI = sum_i (p_i - q_i) * ln(p_i / q_i)     p = window fractions, q = reference fractions

Alerting: PSI > 0.25 on any feature (settings.drift_threshold) sets jaxclf_drift_alert{feature} to 1;
0.1..0.25 is "watch". PSI is NaN until the window holds drift_min_samples requests, because a
histogram of a handful of requests says nothing. The low-confidence rate (top-1 < 0.5 by default)
is reported beside the reference's own rate.

reference_stats.json (version 1), written by `compute_reference_stats` (export uses it on the
training/validation images and the model's own predictions there):
  {"version": 1, "count": N,
   "input":  {"brightness": {"edges": [...], "fractions": [...]}, "contrast": {...},
              "aspect": {...}, "width": {...}, "height": {...},
              "channels": {"values": [1, 2, 3, 4], "fractions": [...]}},
   "output": {"class_distribution": {"labels": [...], "fractions": [...]},
              "confidence": {"edges": [...], "fractions": [...]},
              "low_confidence_rate": r, "low_confidence_threshold": 0.5}}
Missing features are simply not monitored, so an older or partial reference still works.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REFERENCE_VERSION = 1
PSI_EPSILON = 1e-4  # floor on bin fractions: an empty bin would make PSI infinite

# Fixed bin edges, so the reference and the live window always histogram the same way.
_INF = float("inf")
DEFAULT_EDGES: dict[str, list[float]] = {
    "brightness": [i / 10 for i in range(11)],
    "contrast": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, _INF],
    "aspect": [0.0, 0.5, 0.75, 0.9, 0.99, 1.01, 1.11, 1.34, 2.0, _INF],  # width / height
    "width": [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, _INF],
    "height": [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, _INF],
    "confidence": [i / 10 for i in range(11)],
}
CHANNEL_VALUES = [1, 2, 3, 4]
INPUT_FEATURES = ("brightness", "contrast", "aspect", "width", "height", "channels")

# Pillow mode -> channels the client sent (before decode converts to the model's channels).
MODE_CHANNELS = {"1": 1, "L": 1, "P": 3, "I": 1, "F": 1, "I;16": 1, "I;16B": 1, "I;16L": 1,
                 "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                 "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4}


@dataclasses.dataclass(frozen=True)
class InputStats:
  width: int
  height: int
  channels: int  # as sent: 1 grey, 2 grey+alpha, 3 colour, 4 colour+alpha / CMYK
  brightness: float  # mean pixel / 255 of the decoded image
  contrast: float  # std of pixels / 255

  @property
  def aspect(self) -> float:
    return self.width / max(self.height, 1)

  def as_dict(self) -> dict[str, float]:
    d = dataclasses.asdict(self)
    d["aspect"] = round(self.aspect, 4)
    d["brightness"], d["contrast"] = round(self.brightness, 4), round(self.contrast, 4)
    return d


def measure_input(img: np.ndarray, width: int, height: int, mode: str) -> InputStats:
  """Stats of a decoded uint8 HWC image; large images are subsampled (the mean is stable)."""
  step = max(1, int(math.sqrt(img.shape[0] * img.shape[1] / 65536)))
  sample = (img[::step, ::step] if step > 1 else img).astype(np.float32).ravel()
  # One dot product for the second moment: this runs on every request.
  n = sample.size
  mean = float(sample.sum()) / n
  var = max(float(sample @ sample) / n - mean * mean, 0.0)
  mean, std = mean / 255.0, math.sqrt(var) / 255.0
  return InputStats(int(width), int(height), MODE_CHANNELS.get(mode, 3), mean, std)


def _histogram(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
  counts, _ = np.histogram(np.clip(values, edges[0], None), bins=np.asarray(edges, np.float64))
  return counts


def _fractions(counts: np.ndarray) -> np.ndarray:
  total = counts.sum()
  return counts / total if total else np.zeros_like(counts, np.float64)


def population_stability_index(actual: Sequence[float], expected: Sequence[float]) -> float:
  """PSI between two distributions over the same bins (fractions or counts; both are normalised)."""
  p = np.asarray(actual, np.float64)
  q = np.asarray(expected, np.float64)
  if p.shape != q.shape:
    raise ValueError(f"PSI needs the same bins, got {p.shape} vs {q.shape}")
  p = np.maximum(p / max(p.sum(), 1e-12), PSI_EPSILON)
  q = np.maximum(q / max(q.sum(), 1e-12), PSI_EPSILON)
  return float(np.sum((p - q) * np.log(p / q)))


def _edges_json(edges: Sequence[float]) -> list[Any]:
  return ["inf" if math.isinf(e) else e for e in edges]


def _edges_from_json(edges: Sequence[Any]) -> list[float]:
  return [float(e) for e in edges]  # float("inf") parses the "inf" marker


def compute_reference_stats(images: Iterable[np.ndarray], probs: np.ndarray,
                            class_names: Sequence[str], *, modes: Sequence[str] | None = None,
                            low_confidence_threshold: float = 0.5) -> dict[str, Any]:
  """reference_stats.json from training-set images (uint8 HWC, as decoded) and the model's
  softmax outputs on them. `modes` are the Pillow modes of the source files, if known."""
  stats = [measure_input(im, im.shape[1], im.shape[0], (modes[i] if modes else
                                                         ("L" if im.shape[2] == 1 else "RGB")))
           for i, im in enumerate(images)]
  if not stats:
    raise ValueError("compute_reference_stats needs at least one image")
  probs = np.asarray(probs, np.float64)
  if probs.shape != (len(stats), len(class_names)):
    raise ValueError(f"probs must be (num_images={len(stats)}, num_classes={len(class_names)}), "
                     f"got {probs.shape}")
  columns = _columns(stats)
  inputs: dict[str, Any] = {}
  for name in INPUT_FEATURES:
    if name == "channels":
      counts = np.array([(columns["channels"] == v).sum() for v in CHANNEL_VALUES])
      inputs[name] = {"values": CHANNEL_VALUES, "fractions": _fractions(counts).tolist()}
    else:
      inputs[name] = {"edges": _edges_json(DEFAULT_EDGES[name]),
                      "fractions": _fractions(_histogram(columns[name], DEFAULT_EDGES[name])).tolist()}
  conf = probs.max(axis=1)
  top1 = probs.argmax(axis=1)
  class_counts = np.bincount(top1, minlength=len(class_names))
  return {
      "version": REFERENCE_VERSION,
      "count": len(stats),
      "input": inputs,
      "output": {
          "class_distribution": {"labels": list(class_names),
                                 "fractions": _fractions(class_counts).tolist()},
          "confidence": {"edges": _edges_json(DEFAULT_EDGES["confidence"]),
                         "fractions": _fractions(_histogram(conf, DEFAULT_EDGES["confidence"])).tolist()},
          "low_confidence_rate": float((conf < low_confidence_threshold).mean()),
          "low_confidence_threshold": low_confidence_threshold,
      },
  }


def _columns(stats: Sequence[InputStats]) -> dict[str, np.ndarray]:
  return {
      "brightness": np.fromiter((s.brightness for s in stats), np.float64, len(stats)),
      "contrast": np.fromiter((s.contrast for s in stats), np.float64, len(stats)),
      "aspect": np.fromiter((s.aspect for s in stats), np.float64, len(stats)),
      "width": np.fromiter((s.width for s in stats), np.float64, len(stats)),
      "height": np.fromiter((s.height for s in stats), np.float64, len(stats)),
      "channels": np.fromiter((s.channels for s in stats), np.int64, len(stats)),
  }


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
    cols = _columns(inputs) if inputs else None
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
        _histogram(conf, _edges_from_json(cref["edges"])), cref["fractions"])
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
    return population_stability_index(_histogram(cols[name], _edges_from_json(ref["edges"])),
                                      ref["fractions"])
