"""The REST gateway: `create_app(settings) -> FastAPI`, composed from small modules.

  POST /v1/predict          multipart `file`        -> top-k for one image
  POST /v1/predict/batch    multipart `files` (n)   -> a result per image; bad images fail alone
  POST /v1/predict/json     {"images": [{"b64"|"url"}]} -> like batch (URL fetch off by default)
  GET  /v1/models  /v1/monitoring  /healthz  /readyz  /metrics  /docs  /openapi.json
  POST /v1/admin/reload     {"model_path"}  (admin token) -> hot swap, no request dropped

  serving/middleware.py   request id, auth before the body, drain, size limits, admission, logs
  serving/direct.py       POST /v1/predict served from the middleware, past the router (hot path)
  serving/auth.py         API keys with token buckets, the admin token, --protect-ops
  serving/routers/        predict.py, admin.py, ops.py
  serving/inputs.py       multipart parser, image checks, decode + preprocess
  serving/url_fetch.py    the SSRF-safe URL fetcher for JSON input
  serving/lifecycle.py    model load / hold / swap / retire;  serving/metrics.py  Prometheus

Every client mistake is a 4xx with {"error": {"code", "message", "field"}, "request_id"}; nothing
a client sends is a 5xx.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api_docs import SECURITY_SCHEMES
from serving.context import Gateway, rid_of
from serving.direct import DirectRoute, find_route
from serving.errors import ApiError, api_error_response, error_response
from serving.inputs import Part, parse_multipart  # noqa: F401  (public: tests, bench)
from serving.lifecycle import build_model
from serving.middleware import GatewayMiddleware, configure_json_logging  # noqa: F401
from serving.routers.admin import create_admin_router
from serving.routers.ops import create_ops_router
from serving.routers.predict import create_predict_router
from serving.settings import ServeSettings

log = logging.getLogger("jaxclf.serving")


def create_app(settings: ServeSettings | None = None) -> FastAPI:
  gw = Gateway.create(settings or ServeSettings())
  settings = gw.settings

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    task = asyncio.create_task(initial_load(gw))
    app.state.load_task = task
    if settings.workers > 1:
      # A worker starts listening (joins the SO_REUSEPORT group) only once its model is loaded,
      # so no connection lands on a worker that would answer 503 while the others serve.
      await task
    yield
    task.cancel()
    if gw.holder.current is not None:
      await run_in_threadpool(gw.holder.current.backend.close)

  app = FastAPI(
      title="jaxclf image classifier",
      version="1",
      description=(
          "Image classification over REST. Send an encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF;"
          " the format is read from the bytes). Errors are JSON: `{\"error\": {\"code\", "
          "\"message\", \"field\"}, \"request_id\"}`. Drift: PSI per feature vs the training "
          f"reference; above {settings.drift_threshold} raises `jaxclf_drift_alert`."),
      lifespan=lifespan,
      # FastAPI's own OpenTelemetry hooks look for a configured provider on every request; the
      # gateway has its Prometheus metrics and JSON logs, so they are opt-in (--otel-telemetry).
      **({} if settings.otel_telemetry else
         {"telemetry": {"tracing": False, "metrics": False, "logs": False}}),
  )
  app.state.gateway = gw
  app.state.settings, app.state.holder, app.state.monitor, app.state.metrics = (
      settings, gw.holder, gw.monitor, gw.metrics)
  add_error_handlers(app)
  for router in (create_predict_router(gw), create_ops_router(gw), create_admin_router(gw)):
    app.include_router(router)

  def openapi_with_security():
    if app.openapi_schema is None:
      from fastapi.openapi.utils import get_openapi
      schema = get_openapi(title=app.title, version=app.version, description=app.description,
                           routes=app.routes)
      schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
      app.openapi_schema = schema
    return app.openapi_schema

  app.openapi = openapi_with_security
  # POST /v1/predict straight from the middleware, past the router (serving/direct.py).
  direct = ({("POST", "/v1/predict"): DirectRoute(find_route(app.routes, "/v1/predict", "POST"),
                                                   app.exception_handlers)}
            if settings.predict_fast_path else {})
  # Outermost, so it also sees (and counts) requests the router rejects.
  app.add_middleware(GatewayMiddleware, gateway=gw, direct=direct)
  return app


async def initial_load(gw: Gateway) -> None:
  try:
    model = await run_in_threadpool(build_model, gw.settings, gw.settings.model_path, gw.on_batch)
  except Exception as e:  # ModelLoadError and whatever the runtime raises: /readyz reports it
    gw.holder.load_error = str(e)
    log.error("model load failed: %s", e)
    return
  gw.install(model)
  batcher = getattr(model.backend, "batcher", None)
  log.info("model ready: %s", json.dumps({**model.ref(), "inline_rows": getattr(
      batcher, "inline_rows", None)}))


def add_error_handlers(app: FastAPI) -> None:
  """Errors as JSON, never a 5xx for anything a client sends."""

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, exc: ApiError):
    request.state.error_code = exc.code
    return api_error_response(exc, rid_of(request))

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request: Request, exc: RequestValidationError):
    ctype = request.headers.get("content-type", "")
    body_errors = any((err.get("loc") or ("",))[0] == "body" for err in exc.errors())
    if body_errors and "json" not in ctype.lower():
      request.state.error_code = "unsupported_media_type"
      return error_response(415, "unsupported_media_type",
                            f"this endpoint takes application/json, got {ctype or 'no content type'}",
                            None, rid_of(request))
    parts, field = [], None
    for err in exc.errors()[:10]:
      loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
      field = field or loc or None
      parts.append(f"{loc or 'body'}: {err.get('msg')}")
    request.state.error_code = "invalid_request"
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request", field,
                          rid_of(request))

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    # Starlette's 405 carries `Allow` (RFC 9110 §15.5.6 requires it): keep the exception's headers.
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                          str(exc.detail), None, rid_of(request), headers=exc.headers)

  @app.exception_handler(Exception)
  async def _unexpected(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); "
                          "see the server log for this request id", None, rid_of(request))
