"""jaxclf.evaluate.metrics and the metrics.json schema: figures checked by hand, against
scikit-learn, and against a plain loop; schema violations named by field."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxclf.evaluate import metrics as M
from jaxclf.evaluate.schema import SCHEMA_VERSION, MetricsSchemaError, load_schema, validate_metrics

# A 3-class case small enough to work out on paper.
#   true:  A A A A | B B B | C C C
#   pred:  A A B B | B B C | C A A
# Confusion (rows true, cols pred):  A [2 2 0]   B [0 2 1]   C [2 0 1]
NAMES = ["A", "B", "C"]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 1, 2, 2, 0, 0])


def _hand_probs():
  """0.7 on the prediction, 0.2 on a runner-up, 0.1 on the rest. The runner-up is the true
  class for every miss except the last (index 9), so top-2 accuracy is 9/10."""
  probs = np.full((10, 3), 0.1)
  for i, (t, p) in enumerate(zip(Y_TRUE, Y_PRED)):
    probs[i, p] = 0.7
    if t == p:
      second = (p + 1) % 3
    elif i != 9:
      second = t
    else:
      second = 3 - t - p  # the third class
    probs[i, second] = 0.2
  return probs


def test_hand_computed_three_class_example():
  probs = _hand_probs()
  assert np.array_equal(probs.argmax(1), Y_PRED)
  m = M.compute_metrics(Y_TRUE, probs, NAMES, n_resamples=200)

  assert m["confusion_matrix"]["counts"] == [[2, 2, 0], [0, 2, 1], [2, 0, 1]]
  assert m["confusion_matrix"]["normalized"][0] == [0.5, 0.5, 0.0]
  assert m["confusion_matrix"]["normalized"][2] == pytest.approx([2 / 3, 0, 1 / 3], abs=1e-6)
  # Per class: A tp2 of 4 predicted, 4 true; B tp2 of 4 predicted, 3 true; C tp1 of 2, 3 true.
  by_name = {c["name"]: c for c in m["per_class"]}
  assert by_name["A"]["precision"] == pytest.approx(2 / 4)
  assert by_name["A"]["recall"] == pytest.approx(2 / 4)
  assert by_name["A"]["f1"] == pytest.approx(0.5)
  assert by_name["B"]["precision"] == pytest.approx(2 / 4)
  assert by_name["B"]["recall"] == pytest.approx(2 / 3)
  assert by_name["B"]["f1"] == pytest.approx(4 / 7)  # 2PR/(P+R) = (2/3)/(7/6)
  assert by_name["C"]["precision"] == pytest.approx(1 / 2)
  assert by_name["C"]["recall"] == pytest.approx(1 / 3)
  assert by_name["C"]["f1"] == pytest.approx(2 / 5)  # (1/3)/(5/6)
  assert [c["support"] for c in m["per_class"]] == [4, 3, 3]
  assert [c["predicted"] for c in m["per_class"]] == [4, 4, 2]
  assert m["ranked_by_f1"] == ["B", "A", "C"]
  assert [by_name[n]["rank"] for n in "BAC"] == [1, 2, 3]

  assert m["accuracy"] == pytest.approx(0.5)
  assert m["macro"]["f1"] == pytest.approx((0.5 + 4 / 7 + 0.4) / 3)
  assert m["weighted"]["f1"] == pytest.approx((4 * 0.5 + 3 * 4 / 7 + 3 * 0.4) / 10)
  assert m["top_k_accuracy"] == pytest.approx({"1": 0.5, "3": 1.0})
  # 5 hits at p=0.7, 4 misses with the truth at 0.2, one at 0.1.
  expected_ll = -(5 * math.log(0.7) + 4 * math.log(0.2) + math.log(0.1)) / 10
  assert m["log_loss"] == pytest.approx(expected_ll)
  # Every confidence is 0.7 (bin (0.667, 0.733]) and accuracy is 0.5: ECE = |0.5 - 0.7|.
  cal = m["calibration"]
  assert cal["ece"] == pytest.approx(0.2)
  full = [b for b in cal["bins"] if b["count"]]
  assert len(full) == 1 and full[0]["count"] == 10 and full[0]["lower"] < 0.7 <= full[0]["upper"]

  pairs = [(p["true"], p["predicted"], p["count"]) for p in m["most_confused_pairs"]]
  assert pairs == [("A", "B", 2), ("C", "A", 2), ("B", "C", 1)]
  assert m["most_confused_pairs"][1]["share_of_true"] == pytest.approx(2 / 3)
  wrong = m["most_confidently_wrong"]
  assert [w["index"] for w in wrong] == [2, 3, 6, 8, 9]  # all at 0.7: stable, by index
  assert wrong[0]["true_index"] == 0 and wrong[0]["predicted_index"] == 1
  assert wrong[-1]["prob_true"] == pytest.approx(0.1)


def test_matches_scikit_learn_on_random_predictions():
  rng = np.random.default_rng(1)
  n, k = 2000, 7
  y = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k))
  logits[np.arange(n), y] += 1.5
  probs = M.softmax(logits)
  m = M.compute_metrics(y, probs, [f"c{i}" for i in range(k)], n_resamples=100)
  pred = probs.argmax(1)
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
  assert m["macro"]["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
  assert m["weighted"]["precision"] == pytest.approx(
      skm.precision_score(y, pred, average="weighted"))
  assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs), rel=1e-9)
  for kk in (3, 5):
    assert m["top_k_accuracy"][str(kk)] == pytest.approx(
        skm.top_k_accuracy_score(y, probs, k=kk, labels=np.arange(k)))
  assert np.array_equal(np.array(m["confusion_matrix"]["counts"]), skm.confusion_matrix(y, pred))


def test_bootstrap_is_seeded_and_equals_a_plain_loop():
  rng = np.random.default_rng(2)
  n, k = 300, 4
  y = rng.integers(0, k, n)
  pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
  ci = M.bootstrap_ci(y, pred, k, n_resamples=200, seed=5)
  assert ci == M.bootstrap_ci(y, pred, k, n_resamples=200, seed=5)
  assert ci != M.bootstrap_ci(y, pred, k, n_resamples=200, seed=6)
  # The same resamples, scored one at a time by scikit-learn (small n: a single chunk).
  idx = np.random.default_rng(5).integers(0, n, size=(200, n))
  accs = [skm.accuracy_score(y[i], pred[i]) for i in idx]
  f1s = [skm.f1_score(y[i], pred[i], labels=np.arange(k), average="macro", zero_division=0)
         for i in idx]
  assert ci["accuracy"]["low"] == pytest.approx(np.quantile(accs, 0.025))
  assert ci["accuracy"]["high"] == pytest.approx(np.quantile(accs, 0.975))
  assert ci["macro_f1"]["low"] == pytest.approx(np.quantile(f1s, 0.025))
  assert ci["macro_f1"]["high"] == pytest.approx(np.quantile(f1s, 0.975))
  point = skm.accuracy_score(y, pred)
  assert ci["accuracy"]["low"] < point < ci["accuracy"]["high"]


def test_bootstrap_interval_narrows_with_more_data():
  rng = np.random.default_rng(3)

  def width(n):
    y = rng.integers(0, 5, n)
    pred = np.where(rng.random(n) < 0.8, y, rng.integers(0, 5, n))
    ci = M.bootstrap_ci(y, pred, 5, n_resamples=300, seed=0)["accuracy"]
    return ci["high"] - ci["low"]

  small, large = width(200), width(20000)
  # sqrt(p(1-p)/n) * 3.92: about 0.10 at n=200 and 0.010 at n=20000.
  assert 0.07 < small < 0.14 and 0.007 < large < 0.014


def test_calibration_of_calibrated_and_overconfident_models():
  rng = np.random.default_rng(4)
  conf = rng.uniform(0.2, 1.0, 100_000)
  calibrated = M.calibration(conf, rng.random(conf.size) < conf)
  assert calibrated["ece"] < 0.01
  over = M.calibration(conf, rng.random(conf.size) < conf - 0.15)
  assert over["ece"] == pytest.approx(0.15, abs=0.01)
  assert sum(b["count"] for b in over["bins"]) == conf.size
  assert over["bins"][0]["count"] == 0 and over["bins"][0]["accuracy"] is None


def test_a_class_absent_from_the_test_set_is_not_averaged():
  y = np.array([0, 0, 1, 1])
  probs = M.softmax(np.array([[5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5.0]]))
  m = M.compute_metrics(y, probs, ["a", "b", "c"], n_resamples=50)
  assert m["classes_in_test"] == 2
  assert m["per_class"][2]["support"] == 0 and m["per_class"][2]["predicted"] == 1
  # a: P=1 R=1 F1=1; b: P=1 R=0.5 F1=2/3; c is left out of the mean.
  assert m["macro"]["f1"] == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize("bad, message", [
    (lambda y, p: (y, p[:, :2]), "class names"),
    (lambda y, p: (y[:-1], p), "y_true"),
    (lambda y, p: (y + 5, p), "labels must be in"),
    (lambda y, p: (y, np.where(p > 0.5, np.nan, p)), "NaN"),
])
def test_bad_inputs_are_named(bad, message):
  y, p = bad(Y_TRUE, _hand_probs())
  with pytest.raises(ValueError, match=message):
    M.compute_metrics(y, p, NAMES)


# ----------------------------------------------------------------------------- schema

def _document():
  m = M.compute_metrics(Y_TRUE, _hand_probs(), NAMES, n_resamples=50)
  return {
      "schema_version": SCHEMA_VERSION, "kind": "jaxclf.evaluation",
      "created_at": "2026-11-30T12:00:00+00:00", "split": "test",
      "model": {"uri": "runs/x", "format": "checkpoint", "path": "/runs/x", "run_dir": "/runs/x",
                "checkpoint": "best", "step": 100, "architecture": "cnn", "sha256": None,
                "input_shape": [28, 28, 1], "class_names": NAMES},
      "data": {"source": "folder", "kind": "image_folder", "name": "folder", "version": None,
               "split": "all", "num_examples": 10, "class_names": NAMES,
               "classes_without_examples": [], "skipped": [
                   {"source": "folder/A/bad.png", "stage": "header", "reason": "not an image"}]},
      "preprocessing": {"image_size": [28, 28], "channels": 1},
      "test": m,
      "val": {"source": "tensorboard", "step": 100, "accuracy": 0.9, "loss": 0.3},
      "model_selection": {"test_used_for_selection": False, "selected_by": "val", "note": "..."},
      "artifacts": {"metrics": "metrics.json"},
  }


def test_schema_file_is_versioned_and_documented():
  schema = load_schema()
  assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
  assert "v1" in schema["$id"]
  # Every top-level field carries a description or is self-evident from a const/ref.
  assert schema["properties"]["val"]["description"]
  assert schema["$defs"]["metrics"]["properties"]["calibration"]["properties"]["ece"]["description"]


def test_schema_accepts_a_valid_document():
  validate_metrics(_document())


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("split"), "'split' is a required property"),
    (lambda d: d.update(split="val"), "$['split']"),
    (lambda d: d["test"].update(accuracy=1.5), "$['test']['accuracy']"),
    (lambda d: d["test"]["per_class"][1].pop("support"), "$['test']['per_class'][1]"),
    (lambda d: d["model_selection"].update(test_used_for_selection=True),
     "$['model_selection']['test_used_for_selection']"),
    (lambda d: d["test"]["top_k_accuracy"].update(best=0.9), "$['test']['top_k_accuracy']"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
])
def test_schema_rejects_bad_documents_naming_the_field(mutate, where):
  doc = copy.deepcopy(_document())
  mutate(doc)
  with pytest.raises(MetricsSchemaError) as e:
    validate_metrics(doc)
  assert where in str(e.value)
