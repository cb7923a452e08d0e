"""Drift reference statistics: the features measured on each image, their fixed histogram bins,
the population stability index, and the reference_stats.json format.

A foundation module (numpy only): export writes reference_stats.json with
`compute_reference_stats` on the training distribution; serving (serving/monitoring.py) measures
live traffic with `measure_input` and compares it with the same bins. Neither imports the other.

Features per image: size, aspect, channels as sent, brightness, contrast; per output: top-1
class and confidence. Drift is the population stability index (PSI) of a feature's histogram
in live traffic against the same histogram of the training set:

  PSI = sum_i (p_i - q_i) * ln(p_i / q_i)     p = window fractions, q = reference fractions

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

import dataclasses
import math
from typing import Any, Iterable, Sequence

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


def histogram(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
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


def edges_from_json(edges: Sequence[Any]) -> list[float]:
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
  columns = feature_columns(stats)
  inputs: dict[str, Any] = {}
  for name in INPUT_FEATURES:
    if name == "channels":
      counts = np.array([(columns["channels"] == v).sum() for v in CHANNEL_VALUES])
      inputs[name] = {"values": CHANNEL_VALUES, "fractions": _fractions(counts).tolist()}
    else:
      inputs[name] = {"edges": _edges_json(DEFAULT_EDGES[name]),
                      "fractions": _fractions(histogram(columns[name], DEFAULT_EDGES[name])).tolist()}
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
                         "fractions": _fractions(histogram(conf, DEFAULT_EDGES["confidence"])).tolist()},
          "low_confidence_rate": float((conf < low_confidence_threshold).mean()),
          "low_confidence_threshold": low_confidence_threshold,
      },
  }


def feature_columns(stats: Sequence[InputStats]) -> dict[str, np.ndarray]:
  return {
      "brightness": np.fromiter((s.brightness for s in stats), np.float64, len(stats)),
      "contrast": np.fromiter((s.contrast for s in stats), np.float64, len(stats)),
      "aspect": np.fromiter((s.aspect for s in stats), np.float64, len(stats)),
      "width": np.fromiter((s.width for s in stats), np.float64, len(stats)),
      "height": np.fromiter((s.height for s in stats), np.float64, len(stats)),
      "channels": np.fromiter((s.channels for s in stats), np.int64, len(stats)),
  }
