"""Temperature scaling (Guo et al. 2017): one scalar T > 0 so that softmax(logits / T) is calibrated.

  fit_temperature(logits, labels) -> T        minimises the mean NLL of softmax(logits / T)
  calibrate(logits, labels)       -> dict     T plus ECE and NLL before / after, for run.json

Contract with the rest of the pipeline (T is applied exactly once, everywhere):
- Training fits T on the validation split's raw logits of the best checkpoint and stores it as
  `PreprocessSpec.temperature` in the run's preprocessing.json (checkpoints keep raw weights).
- `jaxclf.train.checkpoints.load_inference(...).logits` returns logits / T (`raw_logits` does not);
  the ONNX export bakes logits / T into the graph; serving only takes the softmax of the graph's
  output and never divides again.

numpy + scipy only (scipy is imported inside `fit_temperature`), no jax: the training loop imports
this at the end of a run and the evaluator on any machine. The ECE is the one of
this module (top-1 confidence, 15 equal-width bins), which `jaxclf.evaluate.metrics` re-exports,
so run.json, metrics.json and the report quote the same figure. It is a foundation module (it
imports nothing of jaxclf): the trainer and the evaluator both use it, so neither imports the other.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

ECE_BINS = 15
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray) -> np.ndarray:
  """Numerically stable softmax in float64 (probabilities that sum to 1 for log loss)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
                ) -> dict[str, Any]:
  """Expected calibration error over equal-width confidence bins, plus the diagram's data.

  Bin b holds confidences in (b/n, (b+1)/n] (the first bin also takes 0). ECE is the
  count-weighted mean |accuracy - mean confidence| over bins; MCE the largest such gap.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  # The 1e-9 keeps a confidence on an edge (0.8 * 15 = 12.000000000000002) in the lower bin.
  idx = np.clip(np.ceil(confidence * n_bins - 1e-9).astype(np.int64) - 1, 0, n_bins - 1)
  count = np.bincount(idx, minlength=n_bins)
  sum_conf = np.bincount(idx, weights=confidence, minlength=n_bins)
  sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
  nonempty = count > 0
  mean_conf = np.divide(sum_conf, count, out=np.zeros(n_bins), where=nonempty)
  acc = np.divide(sum_acc, count, out=np.zeros(n_bins), where=nonempty)
  gap = np.abs(acc - mean_conf)
  n = len(confidence)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  bins = [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
           "accuracy": float(acc[b]) if nonempty[b] else None,
           "confidence": float(mean_conf[b]) if nonempty[b] else None}
          for b in range(n_bins)]
  return {
      "ece": float(np.sum(count * gap) / n),
      "mce": float(gap[nonempty].max()) if nonempty.any() else 0.0,
      "n_bins": n_bins,
      "mean_confidence": float(confidence.mean()),
      "accuracy": float(correct.mean()),
      "bins": bins,
  }


def top1_calibration(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
                     ) -> dict[str, Any]:
  """`calibration` of the top-1 prediction: confidence = max probability, correct = argmax hits.
  The ECE every figure of the project uses (metrics.json, temperature fitting, run.json)."""
  probs = np.asarray(probs, np.float64)
  y_true = np.asarray(y_true, np.int64)
  pred = probs.argmax(axis=1)
  return calibration(probs[np.arange(len(pred)), pred], pred == y_true, n_bins)


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.int64).reshape(-1)
  if z.ndim != 2:
    raise ValueError(f"logits must be (N, K), got shape {z.shape}")
  if len(z) != len(y):
    raise ValueError(f"{len(z)} rows of logits for {len(y)} labels")
  if len(z) == 0:
    raise ValueError("no examples to calibrate on")
  if y.min() < 0 or y.max() >= z.shape[1]:
    raise ValueError(f"labels must be in [0, {z.shape[1]}), got [{y.min()}, {y.max()}]")
  if not np.all(np.isfinite(z)):
    raise ValueError("logits contain NaN or infinity")
  return z, y


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
  """Mean negative log-likelihood of softmax(z / T), in nats (float64, stable)."""
  return float(-_log_softmax(z / temperature)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, t_min: float = T_MIN,
                    t_max: float = T_MAX) -> float:
  """The T in [t_min, t_max] minimising the NLL of softmax(logits / T) on (logits, labels).

  NLL is convex in 1/T, hence unimodal in log T, so a bounded scalar search over log T finds the
  global minimum. T = 1 is kept whenever the optimum is not strictly better (flat NLL: e.g. all
  logits equal), so an uninformative split never moves the model's confidences.
  """
  from scipy.optimize import minimize_scalar  # ~0.1 s; only when fitting

  z, y = _check(logits, labels)
  if not 0 < t_min < t_max:
    raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")
  res = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)),
                        bounds=(math.log(t_min), math.log(t_max)), method="bounded",
                        options={"xatol": 1e-6, "maxiter": 500})
  t = float(min(max(math.exp(float(res.x)), t_min), t_max))
  # Brent's bounded search never evaluates the end points exactly: check them (an optimum at a
  # bound) and T = 1 (no change; wins ties) before trusting the interior answer.
  candidates = ([1.0] if t_min <= 1.0 <= t_max else []) + [t, t_min, t_max]
  scores = [_nll(z, y, c) for c in candidates]
  best = min(scores)
  if candidates[0] == 1.0 and scores[0] <= best + 1e-12:
    return 1.0
  return float(candidates[int(np.argmin(scores))])


def calibrate(logits: np.ndarray, labels: np.ndarray, *, n_bins: int = ECE_BINS) -> dict[str, Any]:
  """Fits T on raw `logits` and reports what it changes:
  {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "count"}
  (ECE: top-1, `n_bins` equal-width bins, as in metrics.json; NLL: mean, nats)."""
  z, y = _check(logits, labels)
  t = fit_temperature(z, y)
  return {
      "temperature": t,
      "ece_before": top1_calibration(y, softmax(z), n_bins)["ece"],
      "ece_after": top1_calibration(y, softmax(z / t), n_bins)["ece"],
      "nll_before": _nll(z, y, 1.0),
      "nll_after": _nll(z, y, t),
      "count": int(len(y)),
  }


def ece(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, *,
        n_bins: int = ECE_BINS) -> float:
  """Top-1 ECE of softmax(logits / temperature), e.g. the test split's before/after figures
  (run.json `test_ece_before` = ece(raw, y), `test_ece_after` = ece(raw, y, T))."""
  z, y = _check(logits, labels)
  return top1_calibration(y, softmax(z / float(temperature)), n_bins)["ece"]
