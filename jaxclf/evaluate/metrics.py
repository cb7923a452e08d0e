"""Classification metrics from (labels, probabilities, class names), as one JSON-ready dict.

scikit-learn does the arithmetic of the standard figures (precision/recall/F1, confusion matrix,
log loss); what it lacks (ECE and the reliability diagram, vectorised bootstrap intervals,
error rankings) is written here in numpy. Nothing here imports jax, so the same code scores a
checkpoint, an ONNX export or predictions loaded from disk. scikit-learn is imported only by
`compute_metrics`. The ECE (`calibration` / `top1_calibration`) and `softmax` live in the
foundation module `jaxclf.calibration`, which the trainer uses too.

Conventions:
- `probs` is (N, K) over the model's K classes; `y_true` holds model class indices.
- Per-class figures cover all K classes; a class with no test examples has support 0 and is
  left out of the macro/weighted averages and the bootstrap (it has nothing to recall).
- A zero denominator gives 0 (scikit-learn's zero_division=0), never NaN, so the JSON stays valid.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxclf.calibration import ECE_BINS, calibration, softmax, top1_calibration  # noqa: F401

DEFAULT_TOP_K = (1, 3, 5)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000  # indices per vectorised chunk (about 16 MB per array)


def check_inputs(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> None:
  if probs.ndim != 2:
    raise ValueError(f"probs must be (N, K), got shape {probs.shape}")
  n, k = probs.shape
  if len(class_names) != k:
    raise ValueError(f"{len(class_names)} class names for {k} probability columns")
  if y_true.shape != (n,):
    raise ValueError(f"y_true must be ({n},) to match probs, got {y_true.shape}")
  if n == 0:
    raise ValueError("no examples to score")
  if y_true.min() < 0 or y_true.max() >= k:
    raise ValueError(f"labels must be in [0, {k}), got range [{y_true.min()}, {y_true.max()}]")
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs contain NaN or infinity (did the model diverge?)")


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
  """Share of examples whose true class is among the k highest scores."""
  k = min(k, probs.shape[1])
  top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
  return float(np.mean(np.any(top == y_true[:, None], axis=1)))


def _f1_from_counts(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> np.ndarray:
  """F1 = 2TP / (2TP + FP + FN) = 2TP / (n_pred + n_true), 0 where both are 0."""
  denom = n_pred + n_true
  return np.divide(2.0 * tp, denom, out=np.zeros(np.shape(tp), np.float64), where=denom > 0)


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, *,
                 classes: np.ndarray | None = None, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
  """Percentile bootstrap intervals for accuracy and macro-F1 (over `classes`).

  Vectorised: each chunk of B resamples draws (B, N) indices at once, and per-class counts for
  all of them come from one bincount over `resample * K + class`, so 1000 resamples of 10k
  examples take well under a second.
  """
  y_true = np.asarray(y_true, np.int64)
  y_pred = np.asarray(y_pred, np.int64)
  n, k = len(y_true), num_classes
  classes = np.arange(k) if classes is None else np.asarray(classes)
  rng = np.random.default_rng(seed)
  chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // n)
  accs, f1s = [], []
  for start in range(0, n_resamples, chunk):
    b = min(chunk, n_resamples - start)
    idx = rng.integers(0, n, size=(b, n))
    t, p = y_true[idx], y_pred[idx]
    hit = t == p
    accs.append(hit.mean(axis=1))
    offset = (np.arange(b) * k)[:, None]
    n_true = np.bincount((offset + t).ravel(), minlength=b * k).reshape(b, k)
    n_pred = np.bincount((offset + p).ravel(), minlength=b * k).reshape(b, k)
    tp = np.bincount((offset + t)[hit], minlength=b * k).reshape(b, k)
    f1s.append(_f1_from_counts(tp, n_pred, n_true)[:, classes].mean(axis=1))
  alpha = (1.0 - level) / 2.0

  def interval(samples: list[np.ndarray]) -> dict[str, float]:
    s = np.concatenate(samples)
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return {"low": float(lo), "high": float(hi), "std": float(s.std(ddof=1)) if len(s) > 1 else 0.0}

  return {"accuracy": interval(accs), "macro_f1": interval(f1s),
          "method": "percentile bootstrap", "level": level, "n_resamples": n_resamples,
          "seed": seed}


def most_confused_pairs(cm: np.ndarray, class_names: Sequence[str], n: int = 10
                        ) -> list[dict[str, Any]]:
  """Off-diagonal cells with the most examples: (true class, predicted class, count, share)."""
  off = cm.astype(np.int64).copy()
  np.fill_diagonal(off, 0)
  support = cm.sum(axis=1)
  order = np.argsort(-off, axis=None, kind="stable")[:n]
  pairs = []
  for flat in order:
    t, p = divmod(int(flat), cm.shape[1])
    if off[t, p] == 0:
      break
    pairs.append({"true": class_names[t], "predicted": class_names[p], "true_index": t,
                  "predicted_index": p, "count": int(off[t, p]),
                  "share_of_true": float(off[t, p] / support[t])})
  return pairs


def most_confidently_wrong(y_true: np.ndarray, probs: np.ndarray, n: int = 16
                           ) -> list[dict[str, Any]]:
  """The misclassified examples the model was surest about, most confident first."""
  pred = probs.argmax(axis=1)
  wrong = np.flatnonzero(pred != y_true)
  conf = probs[wrong, pred[wrong]]
  order = wrong[np.argsort(-conf, kind="stable")[:n]]
  return [{"index": int(i), "true_index": int(y_true[i]), "predicted_index": int(pred[i]),
           "confidence": float(probs[i, pred[i]]), "prob_true": float(probs[i, y_true[i]])}
          for i in order]


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *,
                    top_k: Sequence[int] = DEFAULT_TOP_K, n_bins: int = ECE_BINS,
                    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                    n_confused: int = 10, n_wrong: int = 16) -> dict[str, Any]:
  """Every figure of the evaluation report (the "metrics" object of metrics.json)."""
  from sklearn import metrics as skm  # seconds to import; only this function needs it

  y_true = np.asarray(y_true, np.int64)
  probs = np.asarray(probs, np.float64)
  class_names = list(class_names)
  check_inputs(y_true, probs, class_names)
  n, k = probs.shape
  labels = np.arange(k)
  y_pred = probs.argmax(axis=1)

  precision, recall, f1, support = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=labels, zero_division=0)
  present = labels[support > 0]
  averages = {}
  for avg in ("macro", "weighted"):
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=present, average=avg,
                                                     zero_division=0)
    averages[avg] = {"precision": float(p), "recall": float(r), "f1": float(f)}

  cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
  row = cm.sum(axis=1, keepdims=True)
  cm_norm = np.divide(cm, row, out=np.zeros(cm.shape), where=row > 0)
  # Probabilities are clipped away from 0 so that a confident miss costs a lot, not infinity.
  clipped = np.clip(probs, 1e-15, 1.0)
  log_loss = skm.log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels)

  per_class = [{"index": i, "name": class_names[i], "precision": float(precision[i]),
                "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i]),
                "predicted": int(cm[:, i].sum())} for i in range(k)]
  # Best first; ties broken by support (more evidence first), then by name for stability.
  ranked = sorted(per_class, key=lambda c: (-c["f1"], -c["support"], c["name"]))
  for rank, c in enumerate(ranked, 1):
    c["rank"] = rank

  return {
      "num_examples": int(n),
      "num_classes": int(k),
      "classes_in_test": int(len(present)),
      "accuracy": float(skm.accuracy_score(y_true, y_pred)),
      "top_k_accuracy": {str(kk): top_k_accuracy(y_true, probs, kk) for kk in top_k if kk <= k},
      "macro": averages["macro"],
      "weighted": averages["weighted"],
      "log_loss": float(log_loss),
      "calibration": top1_calibration(y_true, probs, n_bins),
      "confidence_intervals": bootstrap_ci(y_true, y_pred, k, classes=present,
                                           n_resamples=n_resamples, seed=seed),
      "per_class": per_class,
      "ranked_by_f1": [c["name"] for c in ranked],
      "confusion_matrix": {"labels": class_names, "counts": cm.astype(int).tolist(),
                           "normalized": np.round(cm_norm, 6).tolist(),
                           "rows": "true class", "columns": "predicted class",
                           "normalization": "row (recall per true class)"},
      "most_confused_pairs": most_confused_pairs(cm, class_names, n_confused),
      "most_confidently_wrong": most_confidently_wrong(y_true, probs, n_wrong),
  }
