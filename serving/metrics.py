"""Prometheus metrics of the gateway, with the drift gauges computed at scrape time."""
from __future__ import annotations

import math
import os

from serving.monitoring import DriftMonitor


class Metrics:
  def __init__(self, monitor: DriftMonitor, threshold: float):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter("jaxclf_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "method", "status"], registry=r)
    self.latency = Histogram(
        "jaxclf_request_latency_seconds", "request latency, receive to response", ["endpoint"],
        buckets=(.0005, .001, .002, .003, .005, .0075, .01, .025, .05, .1, .25, .5, 1, 2.5, 10),
        registry=r)
    self.batch_size = Histogram("jaxclf_inference_batch_size", "images per model call",
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
    self.images = Counter("jaxclf_images", "images seen, by outcome", ["outcome"], registry=r)
    self.model_info = Gauge("jaxclf_model_info", "the model being served (value 1)",
                            ["name", "version", "sha256", "backend"], registry=r)
    self.reloads = Counter("jaxclf_model_reloads", "admin reloads by result", ["result"],
                           registry=r)
    self.ready = Gauge("jaxclf_ready", "1 when a model is loaded and warmed up", registry=r)
    self.inflight = Gauge("jaxclf_inflight_requests", "requests being processed", registry=r)
    # Which process answered the scrape: with --workers N each worker has its own registry.
    Gauge("jaxclf_worker_info", "the gateway process that answered (value 1)", ["pid"],
          registry=r).labels(str(os.getpid())).set(1)
    r.register(_DriftCollector(monitor, threshold))
    # Labelled children, looked up once: `labels()` takes a lock and builds a key on every call,
    # and this runs on every request. Bounded, as the label values come from requests.
    self._children: dict[tuple, tuple] = {}
    self.images_ok, self.images_error = self.images.labels("ok"), self.images.labels("error")

  def observe_request(self, endpoint: str, method: str, status: str, seconds: float) -> None:
    key = (endpoint, method, status)
    pair = self._children.get(key)
    if pair is None:
      pair = (self.requests.labels(endpoint, method, status), self.latency.labels(endpoint))
      if len(self._children) < 4096:
        self._children[key] = pair
    pair[0].inc()
    pair[1].observe(seconds)

  def set_model(self, model: LoadedModel) -> None:
    self.model_info.clear()
    b = model.bundle
    self.model_info.labels(b.name, b.version, b.sha256 or "", model.backend.kind).set(1)
    self.ready.set(1)


class _DriftCollector:
  """Drift gauges computed at scrape time from the rolling window."""

  def __init__(self, monitor: DriftMonitor, threshold: float):
    self.monitor, self.threshold = monitor, threshold

  def describe(self):
    return []

  def collect(self):
    from prometheus_client.core import GaugeMetricFamily
    snap = self.monitor.snapshot()
    psi = GaugeMetricFamily("jaxclf_drift_psi", "PSI of the rolling window vs the training "
                            "reference (NaN until min_samples)", labels=["feature"])
    alert = GaugeMetricFamily("jaxclf_drift_alert", f"1 when PSI > {self.threshold}",
                              labels=["feature"])
    for feature, value in snap["psi"].items():
      psi.add_metric([feature], value)
      if not math.isnan(value):
        alert.add_metric([feature], float(value > self.threshold))
    yield psi
    yield alert
    yield GaugeMetricFamily("jaxclf_drift_threshold", "PSI alert threshold", value=self.threshold)
    yield GaugeMetricFamily("jaxclf_drift_window_samples", "requests in the monitoring window",
                            value=snap["samples"])
    yield GaugeMetricFamily("jaxclf_low_confidence_rate", "share of the window whose top-1 "
                            "confidence is below the threshold", value=snap["low_confidence_rate"])
    yield GaugeMetricFamily("jaxclf_mean_confidence", "mean top-1 confidence in the window",
                            value=snap["mean_confidence"])
