"""GET /healthz /readyz (probes, always open), /metrics /v1/models /v1/monitoring (behind the API
key with --protect-ops: /v1/models shows the source path and sha256)."""
from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from serving import schemas
from serving.api_docs import FORBIDDEN, OPS_SECURITY, RATE_LIMITED, UNAUTHORIZED
from serving.context import Gateway


def create_ops_router(gw: Gateway) -> APIRouter:
  router = APIRouter()
  holder, settings = gw.holder, gw.settings
  auth_errors = {401: UNAUTHORIZED, 403: FORBIDDEN, 429: RATE_LIMITED}
  locked = settings.protect_ops and bool(gw.guard.keys)
  protected = {"openapi_extra": OPS_SECURITY, "responses": auth_errors} if locked else {}

  @router.get("/v1/models", response_model=schemas.ModelsResponse, tags=["models"], **protected)
  async def list_models():
    models = []
    if holder.current is not None:
      m = holder.current
      b = m.bundle
      models.append({**m.ref(), "sha256": b.sha256, "source": b.source_uri, "classes": b.labels,
                     "input_shape": list(b.spec.input_shape), "preprocessing": b.spec.to_dict(),
                     "has_drift_reference": b.reference is not None, "loaded_at": m.loaded_at})
    return {"models": models, "limits": settings.public_limits()}

  @router.get("/healthz", response_model=schemas.HealthResponse, tags=["ops"])
  async def healthz():
    return {"status": "ok"}

  @router.get("/readyz", response_model=schemas.HealthResponse, tags=["ops"],
              responses={503: {"model": schemas.HealthResponse}})
  async def readyz():
    if gw.draining:  # the load balancer takes this instance out while in-flight work finishes
      return JSONResponse({"status": "draining", "detail": "shutting down"}, status_code=503)
    if holder.current is None:
      return JSONResponse({"status": "loading" if holder.load_error is None else "failed",
                           "detail": holder.load_error}, status_code=503)
    model = holder.current
    # A remote backend (Triton) can go away after load: not ready while it is down, so the load
    # balancer stops sending here, and ready again by itself once it is back.
    backend = model.backend
    if backend.remote and not await run_in_threadpool(backend.ready):
      return JSONResponse({"status": "backend_unavailable", "model": model.ref(),
                           "detail": f"the inference server is not ready ({backend.kind})"},
                          status_code=503)
    return {"status": "ready", "model": model.ref()}

  text = {200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}}

  @router.get("/metrics", tags=["ops"], response_class=Response,
              **{**protected, "responses": {**text, **protected.get("responses", {})}})
  async def prometheus_metrics():
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

  @router.get("/v1/monitoring", response_model=schemas.MonitoringResponse, tags=["ops"],
              **protected)
  async def monitoring():
    snap = {k: _nan_to_none(v) for k, v in gw.monitor.snapshot().items()}
    snap["model"] = holder.current.ref() if holder.current else None
    return JSONResponse(snap)

  return router


def _nan_to_none(value: Any) -> Any:
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  return value
