"""Temperature scaling (jaxclf.calibration): recovers a known temperature, lowers the ECE
of under- and over-confident logits, keeps T = 1 when nothing is learnt, stays jax-free; and the
spec field that carries T (old preprocessing.json files without it still load)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxclf.data.transforms import PreprocessSpec
from jaxclf.evaluate import metrics as M
from jaxclf.calibration import T_MAX, T_MIN, calibrate, ece, fit_temperature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def calibrated_sample(n=20000, k=10, seed=0, scale=3.0):
  """Logits z and labels drawn from softmax(z): z is perfectly calibrated by construction."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0.0, scale, (n, k))
  p = M.softmax(z)
  u = rng.random((n, 1))
  y = np.minimum((p.cumsum(1) < u).sum(1), k - 1)  # inverse-CDF draw, vectorised
  return z, y


@pytest.mark.parametrize("true_t", [0.4, 1.0, 2.5, 6.0])
def test_fit_temperature_recovers_a_known_temperature(true_t):
  z, y = calibrated_sample()
  # A model whose logits are the calibrated ones times T needs exactly T to undo it.
  t = fit_temperature(z * true_t, y)
  assert t == pytest.approx(true_t, rel=0.05)


def test_calibrating_under_confident_logits_lowers_ece():
  z, y = calibrated_sample(seed=1)
  under = z * 0.5  # what label smoothing does: confidences pulled towards uniform
  out = calibrate(under, y)
  assert set(out) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "count"}
  assert out["count"] == len(y)
  assert out["temperature"] == pytest.approx(0.5, rel=0.05)  # T < 1 sharpens
  assert out["ece_before"] > 0.1 and out["ece_after"] < 0.02
  assert out["ece_after"] < out["ece_before"] and out["nll_after"] < out["nll_before"]
  # The ECE is the one of metrics.json (same bins, same top-1 confidence).
  assert out["ece_before"] == pytest.approx(M.compute_metrics(
      y, M.softmax(under), [str(i) for i in range(10)], n_resamples=10)["calibration"]["ece"])
  assert ece(under, y, out["temperature"]) == pytest.approx(out["ece_after"])
  # Temperature never changes a prediction.
  assert (M.softmax(under / out["temperature"]).argmax(1) == under.argmax(1)).all()


def test_calibrating_over_confident_logits_lowers_ece():
  z, y = calibrated_sample(seed=2)
  out = calibrate(z * 3.0, y)
  assert out["temperature"] == pytest.approx(3.0, rel=0.05) and out["ece_after"] < out["ece_before"]


def test_fit_is_robust_at_the_edges():
  # Uninformative logits: the NLL is flat in T, so T stays 1.
  assert fit_temperature(np.zeros((30, 3)), np.arange(30) % 3) == 1.0
  # Every example right with a margin: the NLL keeps falling as T shrinks, towards the lower
  # bound (it reaches 0 in float64 before the bound, where any smaller T is as good).
  z = np.eye(4)[np.arange(40) % 4] * 5.0
  assert T_MIN <= fit_temperature(z, np.arange(40) % 4) < 0.25
  # Confidently wrong on everything: the flattest allowed softmax.
  assert fit_temperature(z, (np.arange(40) + 1) % 4) == pytest.approx(T_MAX)
  # float32 input, a single example, and huge logits do not overflow.
  t = fit_temperature(np.array([[1e4, 0.0, -1e4]], np.float32), [1])
  assert T_MIN <= t <= T_MAX
  for bad in ((np.zeros((2, 3)), [0, 3]), (np.zeros((0, 3)), []), (np.full((2, 3), np.nan), [0, 1]),
              (np.zeros((2, 3)), [0])):
    with pytest.raises(ValueError):
      fit_temperature(*bad)


def test_calibration_module_stays_light():
  """The training loop imports it at the end of a run: no jax, no scikit-learn, no scipy until
  a fit runs."""
  code = ("import sys, jaxclf.calibration; "
          "print(json.dumps([m for m in ('jax', 'sklearn', 'scipy', 'onnx', 'matplotlib') "
          "if m in sys.modules]))")
  out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                       text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout) == []


def test_spec_carries_the_temperature_and_old_specs_load():
  spec = PreprocessSpec(class_names=("a", "b"), temperature=0.75)
  assert PreprocessSpec.from_json(spec.to_json()) == spec
  assert json.loads(spec.to_json())["temperature"] == 0.75
  old = spec.to_dict()
  del old["temperature"]  # a preprocessing.json written before temperature scaling
  assert PreprocessSpec.from_dict(old).temperature == 1.0
  assert PreprocessSpec(temperature=np.float32(2)).temperature == 2.0
  for bad in (0, -1.0, float("nan"), float("inf"), "1", True):
    with pytest.raises(ValueError, match="temperature"):
      PreprocessSpec(temperature=bad)
