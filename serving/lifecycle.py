"""The served model's lifecycle: load + warm up, hold, swap on reload, retire the old one."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from serving.backends import (ModelBundle, ModelLoadError, OnnxBackend, TritonBackend,
                              load_bundle)
from serving.errors import RateLimited
from serving.settings import ServeSettings


@dataclasses.dataclass
class LoadedModel:
  bundle: ModelBundle
  backend: Any  # OnnxBackend | TritonBackend
  loaded_at: float
  inflight: int = 0

  def ref(self) -> dict[str, str]:
    return {"name": self.bundle.name, "version": self.bundle.version, "backend": self.backend.kind}


def build_model(settings: ServeSettings, model_path: str | None, on_batch=None) -> LoadedModel:
  """Load + warm up (blocking; call from a thread). Raises ModelLoadError with a clear message."""
  bundle = (load_bundle(model_path, allow_unverified=settings.allow_unverified)
            if model_path else None)
  if settings.backend == "triton":
    if not settings.triton_model:
      raise ModelLoadError("--backend triton needs --model (the Triton ensemble, e.g. fashion_image)")
    backend = TritonBackend(bundle, url=settings.triton_url, model=settings.triton_model,
                            protocol=settings.triton_protocol, timeout_s=settings.triton_timeout_s,
                            on_batch=on_batch)
  else:
    if bundle is None:
      raise ModelLoadError("no model: pass --model-path (export dir or registry:NAME@stage)")
    backend = OnnxBackend(bundle, threads=settings.ort_threads(),
                          micro_batching=settings.micro_batching,
                          max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                          inline_budget_us=settings.inline_budget_us, on_batch=on_batch)
  try:
    backend.warmup(settings.warmup_runs)
  except Exception:
    backend.close()
    raise
  return LoadedModel(backend.bundle, backend, time.time())


class ModelHolder:
  """The model being served; a reload swaps it while requests in flight finish on the old one."""

  def __init__(self):
    self.current: LoadedModel | None = None
    self.load_error: str | None = None
    self.reload_lock = asyncio.Lock()

  @contextlib.contextmanager
  def use(self):
    model = self.current
    if model is None:
      detail = f": {self.load_error}" if self.load_error else " yet (warming up)"
      raise RateLimited(1.0, f"no model loaded{detail}", code="not_ready", status=503)
    model.inflight += 1  # event-loop thread only: no lock needed
    try:
      yield model
    finally:
      model.inflight -= 1


async def retire(model: LoadedModel, grace_s: float = 60.0) -> None:
  """Close a swapped-out model once its last request has finished."""
  deadline = time.monotonic() + grace_s
  while model.inflight > 0 and time.monotonic() < deadline:
    await asyncio.sleep(0.01)
  await run_in_threadpool(model.backend.close)
