"""Drift monitoring: PSI maths, and the live gauges of a real server fed real Fashion-MNIST images.

In-distribution (the test split) must stay under the alert threshold; the same images inverted
(a white background, as in a photo of a garment on a table) must cross it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import requests

from jaxclf.data.reference_stats import (compute_reference_stats, measure_input,
                                         population_stability_index)
from serving.monitoring import DriftMonitor
from test_serving import Server, fashion_arrays, png, session_export

WINDOW = 200


def test_psi_is_zero_for_equal_and_large_for_shifted_distributions():
  assert population_stability_index([10, 20, 70], [0.1, 0.2, 0.7]) == pytest.approx(0.0, abs=1e-12)
  small = population_stability_index([12, 19, 69], [0.1, 0.2, 0.7])
  large = population_stability_index([70, 20, 10], [0.1, 0.2, 0.7])
  assert 0 < small < 0.01 and large > 1.0
  # Empty bins are floored, not infinite.
  assert math.isfinite(population_stability_index([0, 0, 100], [0.5, 0.5, 0.0]))
  with pytest.raises(ValueError, match="same bins"):
    population_stability_index([1, 2], [1, 2, 3])


def test_monitor_needs_min_samples_and_flags_brightness_shift():
  x, _ = fashion_arrays()["train"]
  ref_imgs = list(x[:1000])
  probs = np.full((1000, 10), 0.1)
  probs[:, 0] = 0.19
  probs /= probs.sum(1, keepdims=True)
  ref = compute_reference_stats(ref_imgs, probs, [str(i) for i in range(10)])
  assert ref["count"] == 1000 and abs(sum(ref["input"]["brightness"]["fractions"]) - 1) < 1e-9
  mon = DriftMonitor([str(i) for i in range(10)], ref, window=100, min_samples=50)
  p = probs[0]
  for img in x[1000:1040]:
    mon.record(measure_input(img, 28, 28, "L"), p)
  assert math.isnan(mon.snapshot()["psi"]["brightness"])  # 40 < min_samples
  for img in x[1040:1100]:
    mon.record(measure_input(img, 28, 28, "L"), p)
  snap = mon.snapshot()
  assert snap["samples"] == 100 and not snap["drift_detected"], snap["psi"]
  for img in x[1100:1200]:
    mon.record(measure_input(255 - img, 28, 28, "L"), p)
  snap = mon.snapshot()
  assert snap["alerts"]["brightness"] and snap["psi"]["brightness"] > 1.0
  with pytest.raises(ValueError, match="classes"):
    DriftMonitor(["a", "b"], ref)


@pytest.fixture(scope="module")
def drift_server(tmp_path_factory):
  export = session_export(tmp_path_factory)
  s = Server(export, tmp_path_factory.mktemp("drift") / "server.log",
             "--monitor-window", str(WINDOW), "--no-request-log")
  yield s
  s.stop()


def _post_batches(server: Server, images: np.ndarray) -> None:
  for i in range(0, len(images), 50):
    files = [("files", (f"{j}.png", png(im), "image/png")) for j, im in enumerate(images[i:i + 50])]
    r = requests.post(server.url + "/v1/predict/batch", files=files, timeout=60)
    assert r.status_code == 200 and r.json()["failed"] == 0, r.text[:300]


def _gauges(server: Server) -> dict[str, float]:
  out = {}
  for line in requests.get(server.url + "/metrics").text.splitlines():
    if line.startswith(("jaxclf_drift_psi{", "jaxclf_drift_alert{")):
      key, value = line.rsplit(" ", 1)
      out[key] = float(value)
  return out


def test_drift_gauge_crosses_threshold_only_for_shifted_traffic(drift_server):
  x_test, _ = fashion_arrays()["test"]
  threshold = requests.get(drift_server.url + "/v1/monitoring").json()["threshold"]
  assert threshold == 0.25

  _post_batches(drift_server, x_test[:WINDOW])  # in distribution
  mon = requests.get(drift_server.url + "/v1/monitoring").json()
  assert mon["samples"] == WINDOW and mon["has_reference"]
  assert not mon["drift_detected"], mon["psi"]
  assert all(v is not None and v < threshold for v in mon["psi"].values()), mon["psi"]
  gauges = _gauges(drift_server)
  assert gauges['jaxclf_drift_psi{feature="brightness"}'] < threshold
  assert all(v == 0.0 for k, v in gauges.items() if k.startswith("jaxclf_drift_alert")), gauges

  _post_batches(drift_server, 255 - x_test[WINDOW:2 * WINDOW])  # inverted: the window is all shifted
  mon = requests.get(drift_server.url + "/v1/monitoring").json()
  assert mon["drift_detected"], mon["psi"]
  assert mon["psi"]["brightness"] > threshold and mon["alerts"]["brightness"]
  assert mon["input_means"]["brightness"] > 0.5  # garments on white
  gauges = _gauges(drift_server)
  assert gauges['jaxclf_drift_psi{feature="brightness"}'] > threshold
  assert gauges['jaxclf_drift_alert{feature="brightness"}'] == 1.0
