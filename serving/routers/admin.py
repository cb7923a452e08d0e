"""POST /v1/admin/reload: hot-swap the served model. The admin token was checked by the middleware
(serving/auth.py) before the body was read; requests in flight finish on the old model."""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from serving import schemas
from serving.api_docs import ERROR_RESPONSES, challenge
from serving.backends import ModelLoadError
from serving.context import Gateway
from serving.errors import ApiError
from serving.lifecycle import build_model, retire

log = logging.getLogger("jaxclf.serving")


ADMIN_RESPONSES = {
    400: ERROR_RESPONSES[400],
    401: {"model": schemas.ErrorResponse, "description": "missing or wrong admin token",
          "headers": challenge("Bearer")},
    403: {"model": schemas.ErrorResponse, "description": "a known caller that may not reload: an "
          "API key instead of the admin token (`forbidden`), or admin endpoints off on this "
          "server (`admin_disabled`)"},
    409: {"model": schemas.ErrorResponse, "description": "hot reload is off with --workers > 1"},
    413: ERROR_RESPONSES[413],
    415: {"model": schemas.ErrorResponse, "description": "the body is not application/json"},
    422: {"model": schemas.ErrorResponse, "description": "the body does not match the schema "
          "(`invalid_request`), or the model at `model_path` cannot be loaded "
          "(`model_load_failed`: missing, tampered, or not an export); the old model keeps serving"},
}


def create_admin_router(gw: Gateway) -> APIRouter:
  router = APIRouter(tags=["admin"])

  @router.post("/v1/admin/reload", response_model=schemas.ReloadResponse,
               openapi_extra={"security": [{"AdminToken": []}]},
               summary="Hot-swap the served model (admin token required)",
               responses=ADMIN_RESPONSES)
  async def admin_reload(body: schemas.ReloadRequest):
    if gw.settings.workers > 1:  # this request reaches one worker: the others would keep the old
      raise ApiError(409, "reload_unsupported", f"hot reload is off with --workers "
                     f"{gw.settings.workers}: each worker holds its own model and this request "
                     "reaches one of them; restart the service to change the model")
    async with gw.holder.reload_lock:
      t0 = time.perf_counter()
      try:
        model = await run_in_threadpool(build_model, gw.settings, body.model_path, gw.on_batch)
      except (ModelLoadError, FileNotFoundError) as e:
        gw.metrics.reloads.labels("failed").inc()
        raise ApiError(422, "model_load_failed", str(e), "model_path") from None
      previous = gw.install(model)
      gw.metrics.reloads.labels("ok").inc()
      if previous is not None:
        asyncio.get_running_loop().create_task(retire(previous))
      log.info("model reloaded: %s -> %s", previous.ref() if previous else None, model.ref())
      return {"previous": previous.ref() if previous else model.ref(), "current": model.ref(),
              "load_seconds": round(time.perf_counter() - t0, 3)}

  return router
