"""`Gateway`: the state one server shares between its middleware and its routers."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from serving.auth import Guard
from serving.lifecycle import LoadedModel, ModelHolder
from serving.metrics import Metrics
from serving.middleware import Admission
from serving.monitoring import DriftMonitor
from serving.settings import ServeSettings
from serving.url_fetch import UrlFetcher

log = logging.getLogger("jaxclf.serving")


@dataclasses.dataclass
class Gateway:
  settings: ServeSettings
  holder: ModelHolder
  monitor: DriftMonitor
  metrics: Metrics
  guard: Guard
  fetcher: UrlFetcher
  admission: Admission
  draining: bool = False
  inflight: int = 0  # HTTP requests inside the middleware now (event-loop thread only)

  @classmethod
  def create(cls, settings: ServeSettings) -> "Gateway":
    monitor = DriftMonitor([], None, window=settings.monitor_window,
                           threshold=settings.drift_threshold,
                           min_samples=settings.drift_min_samples,
                           low_confidence_threshold=settings.low_confidence_threshold)
    gw = cls(settings, ModelHolder(), monitor, Metrics(monitor, settings.drift_threshold),
             Guard(settings), UrlFetcher(settings),
             Admission(settings.max_inflight, settings.max_queue))
    # Read at scrape time from the count the middleware keeps anyway (no lock per request).
    gw.metrics.inflight.set_function(lambda: gw.inflight)
    return gw

  @property
  def on_batch(self):
    return self.metrics.batch_size.observe

  def install(self, model: LoadedModel) -> LoadedModel | None:
    """Makes `model` the one served; returns the one it replaces (still finishing requests)."""
    previous, self.holder.current = self.holder.current, model
    self.holder.load_error = None
    self.monitor.reset(model.bundle.labels, model.bundle.reference)
    self.metrics.set_model(model)
    return previous

  async def run_model(self, model: LoadedModel, images: list[Any]) -> np.ndarray:
    """Checked images (inputs.ImageResult) -> logits, through the micro-batcher when there is one."""
    backend = model.backend
    if backend.batcher is not None:
      x = images[0].prepared.tensor[None] if len(images) == 1 else np.stack(
          [r.prepared.tensor for r in images])
      return await backend.batcher.infer(x)
    return await run_in_threadpool(backend.infer_sync, [r.prepared for r in images])


def rid_of(request: Request) -> str | None:
  return getattr(request.state, "request_id", None)
