"""The REST gateway: `create_app(settings) -> FastAPI`.

  POST /v1/predict          multipart `file`        -> top-k for one image
  POST /v1/predict/batch    multipart `files` (n)   -> a result per image; bad images fail alone
  POST /v1/predict/json     {"images": [{"b64"|"url"}]} -> like batch (URL fetch off by default)
  GET  /v1/models  /v1/monitoring  /healthz  /readyz  /metrics  /docs  /openapi.json
  POST /v1/admin/reload     {"model_path"}  (admin token) -> hot swap, no request dropped

Every image goes through jaxclf.data.decode.decode_image (format by content, pixel limit) and
jaxclf.data.transforms.preprocess: the code training and evaluation use. Every client mistake is
a 4xx with {"error": {"code", "message", "field"}, "request_id"}; nothing a client sends is a 5xx.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import itertools
import json
import logging
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxclf.data.decode import FORMATS, DecodeError, decode_image, probe
from jaxclf.data.transforms import preprocess
from serving import schemas
from serving.backends import (ModelBundle, ModelLoadError, OnnxBackend, PreparedImage,
                              TritonBackend, load_bundle, softmax)
from serving.monitoring import DriftMonitor, InputStats, measure_input
from serving.settings import ServeSettings

log = logging.getLogger("jaxclf.serving")
access_log = logging.getLogger("jaxclf.serving.access")

# Decoding a small image costs less than a hop to the thread pool; big ones must not block the loop.
INLINE_DECODE_PIXELS = 512 * 512
INLINE_DECODE_BYTES = 256 * 1024
ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RID_PREFIX = uuid.uuid4().hex[:8]
_RID_COUNTER = itertools.count(1)
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024  # read (and drop) an oversized body up to this, then answer


class ApiError(Exception):
  """A client-facing error: status, a stable code, and a message that says what to fix."""

  def __init__(self, status: int, code: str, message: str, field: str | None = None):
    super().__init__(message)
    self.status, self.code, self.message, self.field = status, code, message, field

  def detail(self) -> dict[str, Any]:
    return {"code": self.code, "message": self.message, "field": self.field}


class BodyTooLarge(Exception):
  pass


class BodyTimeout(Exception):
  pass


def error_response(status: int, code: str, message: str, field: str | None = None,
                   request_id: str | None = None) -> JSONResponse:
  return JSONResponse({"error": {"code": code, "message": message, "field": field},
                       "request_id": request_id}, status_code=status)


# --------------------------------------------------------------------------- model lifecycle

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
  bundle = load_bundle(model_path) if model_path else None
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
      raise ApiError(503, "not_ready", f"no model loaded{detail}")
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


# --------------------------------------------------------------------------- metrics

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
    r.register(_DriftCollector(monitor, threshold))

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


# --------------------------------------------------------------------------- ASGI middleware

class GatewayMiddleware:
  """Request id, body-size limit, metrics and one JSON log line per request.

  Plain ASGI rather than BaseHTTPMiddleware: it sits on every request's hot path.
  """

  def __init__(self, app, settings: ServeSettings, metrics: Metrics, holder: ModelHolder):
    self.app, self.settings, self.metrics, self.holder = app, settings, metrics, holder

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    start = time.perf_counter()
    headers = dict(scope.get("headers") or ())
    rid = headers.get(b"x-request-id", b"").decode("latin-1")
    if not _REQUEST_ID_RE.match(rid):
      rid = f"{_RID_PREFIX}{next(_RID_COUNTER):08x}"  # unique per process, no syscall
    state = scope.setdefault("state", {})
    state["request_id"] = rid
    status_box = [500]
    # One image per request there: no reason to accept more than one image's worth of body.
    limit = (self.settings.max_upload_bytes + 65536 if scope["path"] == "/v1/predict"
             else self.settings.max_request_bytes)
    rid_header = (b"x-request-id", rid.encode())
    self.metrics.inflight.inc()
    try:
      length = headers.get(b"content-length")
      if length is not None and (not length.isdigit() or int(length) > limit):
        status_box[0] = 413
        await self._drain(receive, int(length) if length.isdigit() else 0)
        message = (f"request body of {int(length)} bytes exceeds the limit of {limit} bytes"
                   if length.isdigit() else "invalid Content-Length header")
        await error_response(413 if length.isdigit() else 400,
                             "payload_too_large" if length.isdigit() else "bad_request",
                             message, None, rid)(scope, receive, self._with_header(send, rid_header))
        return
      received = [0]
      too_large = [False]
      too_slow = [False]
      body_done = [False]
      replaced = [False]
      body_deadline = start + self.settings.request_timeout_s

      async def counting_receive():
        if body_done[0]:  # after the body: a wait for disconnect, no deadline
          return await receive()
        try:
          # A client that trickles its body (slowloris) must not hold a slot forever.
          async with asyncio.timeout_at(asyncio.get_running_loop().time()
                                        + max(0.0, body_deadline - time.perf_counter())):
            message = await receive()
        except TimeoutError:
          too_slow[0] = True
          raise BodyTimeout() from None
        if message["type"] == "http.request":
          received[0] += len(message.get("body", b""))
          if not message.get("more_body"):
            body_done[0] = True
          if received[0] > limit:
            too_large[0] = True
            raise BodyTooLarge()
        return message

      async def guarded_send(message):
        if message["type"] == "http.response.start":
          if too_large[0] or too_slow[0]:  # whatever the app made of a cut body, say why
            replaced[0] = True
            status_box[0] = 413 if too_large[0] else 408
            resp = (error_response(413, "payload_too_large",
                                   f"request body exceeds the limit of {limit} bytes", None, rid)
                    if too_large[0] else
                    error_response(408, "request_timeout", "the request body did not arrive within "
                                   f"{self.settings.request_timeout_s} s", None, rid))
            await resp(scope, receive, self._with_header(send, rid_header))
            return
          status_box[0] = message["status"]
          message.setdefault("headers", [])
          message["headers"] = list(message["headers"]) + [rid_header]
        elif replaced[0]:
          return
        await send(message)

      await self.app(scope, counting_receive, guarded_send)
    finally:
      self.metrics.inflight.dec()
      elapsed = time.perf_counter() - start
      route = scope.get("route")
      endpoint = getattr(route, "path", None) or "unmatched"
      self.metrics.requests.labels(endpoint, scope["method"], str(status_box[0])).inc()
      self.metrics.latency.labels(endpoint).observe(elapsed)
      if self.settings.log_requests and endpoint not in ("/metrics", "/healthz", "/readyz"):
        model = self.holder.current
        access_log.info("request", extra={"json": {
            "request_id": rid, "method": scope["method"], "path": scope["path"],
            "endpoint": endpoint, "status": status_box[0],
            "latency_ms": round(elapsed * 1000, 3),
            "client": (scope.get("client") or ("", 0))[0],
            "model_version": model.bundle.version if model else None,
            "images": state.get("images"), "error": state.get("error_code")}})

  @staticmethod
  def _with_header(send, header):
    async def wrapped(message):
      if message["type"] == "http.response.start":
        message["headers"] = list(message.get("headers", [])) + [header]
      await send(message)
    return wrapped

  @staticmethod
  async def _drain(receive, expected: int) -> None:
    """Read an oversized body and drop it, so the client sees the 413 instead of a reset socket."""
    if expected > DRAIN_LIMIT_BYTES:
      return
    seen = 0
    while True:
      message = await receive()
      if message["type"] != "http.request":
        return
      seen += len(message.get("body", b""))
      if not message.get("more_body") or seen > DRAIN_LIMIT_BYTES:
        return


class JsonLogFormatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
             "logger": record.name}
    payload = getattr(record, "json", None)
    if payload is not None:
      entry.update(payload)
    else:
      entry["message"] = record.getMessage()
    if record.exc_info:
      entry["exception"] = self.formatException(record.exc_info)
    return json.dumps(entry, default=str)


def configure_json_logging(level: str = "INFO", stream=None) -> None:
  handler = logging.StreamHandler(stream or sys.stderr)
  handler.setFormatter(JsonLogFormatter())
  for name in ("jaxclf.serving", "uvicorn", "uvicorn.error"):
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


# --------------------------------------------------------------------------- multipart

@dataclasses.dataclass
class Part:
  name: str
  filename: str | None
  content_type: str | None
  data: bytes


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
  """RFC 7578 multipart/form-data from a complete, size-limited body.

  The body is already bounded by the gateway's request limit, so parsing it in memory with
  bytes.find is safe and several times cheaper than a streaming parser that spools each file to a
  temporary file: this is on the path of every request.
  """
  from python_multipart.multipart import parse_options_header
  _, params = parse_options_header(content_type)
  boundary = params.get(b"boundary")
  if not boundary:
    raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
  delimiter = b"--" + boundary
  pos = body.find(delimiter)
  if pos < 0:
    raise ApiError(400, "bad_multipart", "malformed multipart body: no boundary found")
  parts: list[Part] = []
  pos += len(delimiter)
  while True:
    if body.startswith(b"--", pos):  # closing delimiter
      return parts
    if not body.startswith(b"\r\n", pos):
      raise ApiError(400, "bad_multipart", "malformed multipart body: no CRLF after a boundary")
    head_end = body.find(b"\r\n\r\n", pos + 2)
    if head_end < 0:
      raise ApiError(400, "bad_multipart", "malformed multipart body: part headers do not end")
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if end < 0:
      raise ApiError(400, "bad_multipart", "malformed multipart body: no closing boundary")
    headers: dict[bytes, bytes] = {}
    for line in body[pos + 2:head_end].split(b"\r\n"):
      key, sep, value = line.partition(b":")
      if not sep:
        raise ApiError(400, "bad_multipart", "malformed multipart body: bad part header line")
      headers[key.strip().lower()] = value.strip()
    disposition, dparams = parse_options_header(headers.get(b"content-disposition", b""))
    if disposition != b"form-data" or b"name" not in dparams:
      raise ApiError(400, "bad_multipart", "malformed multipart body: a part lacks "
                     "Content-Disposition: form-data; name=...")
    filename = dparams.get(b"filename")
    if len(parts) >= max_parts:
      raise ApiError(413, "too_many_files", f"more than {max_parts} parts (max_batch_files)",
                     "files")
    parts.append(Part(dparams[b"name"].decode("utf-8", "replace"),
                      filename.decode("utf-8", "replace") if filename is not None else None,
                      headers[b"content-type"].decode("latin-1") if b"content-type" in headers
                      else None, body[head_end + 4:end]))
    pos = end + 2 + len(delimiter)


# --------------------------------------------------------------------------- images in

@dataclasses.dataclass
class ImageResult:
  prepared: PreparedImage
  stats: InputStats
  info: dict[str, Any]


def _check_part_type(content_type: str | None, source: str, field: str) -> None:
  ctype = (content_type or "").split(";")[0].strip().lower()
  if ctype and not ctype.startswith(ACCEPTED_PART_TYPES):
    raise ApiError(415, "unsupported_media_type",
                   f"{source}: declared content type {ctype!r} is not an image (send image/* or "
                   "application/octet-stream; the format is checked from the bytes)", field)


def prepare_image(data: bytes, source: str, field: str, settings: ServeSettings,
                  bundle: ModelBundle, needs_tensor: bool, header=None) -> ImageResult:
  """Bytes -> checked, decoded, measured and (for in-process inference) preprocessed image."""
  if not data:
    raise ApiError(400, "empty_file", f"{source}: empty file (0 bytes)", field)
  if len(data) > settings.max_upload_bytes:
    raise ApiError(413, "file_too_large", f"{source}: {len(data)} bytes exceeds the per-image "
                   f"limit of {settings.max_upload_bytes} bytes", field)
  try:
    header = header or probe(data, source)
  except DecodeError as e:
    if e.stage == "limit":  # Pillow's own bomb guard fires while reading the header
      raise ApiError(413, "image_too_large", str(e), field) from None
    raise ApiError(415, "not_an_image", str(e), field) from None
  if header.format not in FORMATS:
    raise ApiError(415, "unsupported_format", f"{source}: {header.format} images are not accepted "
                   f"(accepted: {', '.join(FORMATS)})", field)
  spec = bundle.spec
  try:
    img = decode_image(data, spec.channels, max_pixels=settings.max_pixels,
                       target_size=spec.image_size, background=spec.background, source=source)
  except DecodeError as e:
    if e.stage == "limit":
      raise ApiError(413, "image_too_large", str(e), field) from None
    raise ApiError(422, "corrupt_image", str(e), field) from None
  stats = measure_input(img, header.width, header.height, header.mode)
  tensor = preprocess(img, spec) if needs_tensor else None
  info = {"width": header.width, "height": header.height, "channels": stats.channels,
          "format": header.format}
  return ImageResult(PreparedImage(data, tensor), stats, info)


async def prepare_image_async(data: bytes, source: str, field: str, settings: ServeSettings,
                              bundle: ModelBundle, needs_tensor: bool) -> ImageResult:
  if len(data) <= INLINE_DECODE_BYTES:
    try:
      header = probe(data, source) if data else None
    except DecodeError:
      header = None  # prepare_image reports it
    if header is None or header.width * header.height <= INLINE_DECODE_PIXELS:
      return prepare_image(data, source, field, settings, bundle, needs_tensor, header)
  return await run_in_threadpool(prepare_image, data, source, field, settings, bundle, needs_tensor)


def top_k_predictions(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
  k = min(k, len(labels))
  order = np.argsort(-probs, kind="stable")[:k]
  return [{"label": labels[i], "index": int(i), "confidence": round(float(probs[i]), 6)}
          for i in order]


# --------------------------------------------------------------------------- the app

MULTIPART_IMAGE_TYPES = ("image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff, "
                         "application/octet-stream")


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
  file_schema = {"type": "string", "format": "binary",
                 "description": "an encoded image file (format checked from its bytes)"}
  prop = ({"type": "array", "items": file_schema, "minItems": 1} if many else file_schema)
  return {"requestBody": {"required": True, "content": {"multipart/form-data": {
      "schema": {"type": "object", "required": [field], "properties": {field: prop}},
      "encoding": {field: {"contentType": MULTIPART_IMAGE_TYPES}}}}}}


# The API key is optional (only when the server sets JAXCLF_SERVE_API_KEY): {} = no auth.
PREDICT_SECURITY = {"security": [{}, {"ApiKey": []}]}
SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "required on predict endpoints when the server sets "
                              "JAXCLF_SERVE_API_KEY"},
    "AdminToken": {"type": "http", "scheme": "bearer",
                   "description": "JAXCLF_SERVE_ADMIN_TOKEN (or header X-Admin-Token)"},
}

TOP_K_PARAMETER = {"name": "top_k", "in": "query", "required": False,
                   "description": "labels to return (default: the server's top_k)",
                   "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}


def parse_top_k(request: Request) -> int | None:
  raw = request.query_params.get("top_k")
  if raw is None:
    return None
  if not raw.strip().isdigit() or not 1 <= int(raw) <= 1000:
    raise ApiError(422, "invalid_request", f"query.top_k: must be an integer from 1 to 1000, got "
                   f"{raw[:40]!r}", "query.top_k")
  return int(raw)


ERROR_RESPONSES = {
    400: {"model": schemas.ErrorResponse, "description": "malformed request"},
    401: {"model": schemas.ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": schemas.ErrorResponse, "description": "body, file or pixel count over a limit"},
    415: {"model": schemas.ErrorResponse, "description": "not multipart, or not an image"},
    422: {"model": schemas.ErrorResponse, "description": "invalid field, or corrupt image"},
    503: {"model": schemas.ErrorResponse, "description": "no model loaded yet"},
}


def create_app(settings: ServeSettings | None = None) -> FastAPI:
  settings = settings or ServeSettings()
  holder = ModelHolder()
  monitor = DriftMonitor([], None, window=settings.monitor_window,
                         threshold=settings.drift_threshold,
                         min_samples=settings.drift_min_samples,
                         low_confidence_threshold=settings.low_confidence_threshold)
  metrics = Metrics(monitor, settings.drift_threshold)
  on_batch = metrics.batch_size.observe

  def install(model: LoadedModel) -> LoadedModel | None:
    previous, holder.current = holder.current, model
    holder.load_error = None
    monitor.reset(model.bundle.labels, model.bundle.reference)
    metrics.set_model(model)
    return previous

  async def initial_load():
    try:
      model = await run_in_threadpool(build_model, settings, settings.model_path, on_batch)
    except Exception as e:  # ModelLoadError and whatever the runtime raises: /readyz reports it
      holder.load_error = str(e)
      log.error("model load failed: %s", e)
      return
    install(model)
    batcher = getattr(model.backend, "batcher", None)
    log.info("model ready: %s", json.dumps({**model.ref(), "inline_rows": getattr(
        batcher, "inline_rows", None)}))

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    task = asyncio.create_task(initial_load())
    app.state.load_task = task
    yield
    task.cancel()
    if holder.current is not None:
      await run_in_threadpool(holder.current.backend.close)

  app = FastAPI(
      title="jaxclf image classifier",
      version="1",
      description=(
          "Image classification over REST. Send an encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF;"
          " the format is read from the bytes). Errors are JSON: `{\"error\": {\"code\", "
          "\"message\", \"field\"}, \"request_id\"}`. Drift: PSI per feature vs the training "
          f"reference; above {settings.drift_threshold} raises `jaxclf_drift_alert`."),
      lifespan=lifespan,
  )
  app.state.settings, app.state.holder, app.state.monitor, app.state.metrics = (
      settings, holder, monitor, metrics)

  # ------------------------------------------------------------------ errors as JSON, never 5xx
  def rid_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, exc: ApiError):
    request.state.error_code = exc.code
    return error_response(exc.status, exc.code, exc.message, exc.field, rid_of(request))

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
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                          str(exc.detail), None, rid_of(request))

  @app.exception_handler(Exception)
  async def _unexpected(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); "
                          "see the server log for this request id", None, rid_of(request))

  # ------------------------------------------------------------------ request helpers
  def check_api_key(request: Request) -> None:
    if settings.api_key:
      given = request.headers.get("x-api-key", "")
      if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

  async def read_form(request: Request, many: bool) -> list[Part]:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
      raise ApiError(415, "unsupported_media_type",
                     f"send multipart/form-data with the image in field "
                     f"{'files' if many else 'file'!r}, got {ctype or 'no content type'}"
                     + ("; for JSON use POST /v1/predict/json" if "json" in ctype else ""))
    try:
      body = await request.body()
    except BodyTooLarge:
      raise ApiError(413, "payload_too_large", "request body exceeds the limit") from None
    except BodyTimeout:
      raise ApiError(408, "request_timeout", f"the request body did not arrive within "
                     f"{settings.request_timeout_s} s") from None
    # A few non-file fields are tolerated (clients add them); everything counts against the cap.
    return parse_multipart(body, ctype, settings.max_batch_files + 16 if many else 16)

  async def run_model(model: LoadedModel, images: list[ImageResult]) -> np.ndarray:
    backend = model.backend
    if backend.batcher is not None:
      x = images[0].prepared.tensor[None] if len(images) == 1 else np.stack(
          [r.prepared.tensor for r in images])
      return await backend.batcher.infer(x)
    return await run_in_threadpool(backend.infer_sync, [r.prepared for r in images])

  def resolve_k(top_k: int | None) -> int:
    return int(top_k or settings.top_k)

  # ------------------------------------------------------------------ predict endpoints
  @app.post("/v1/predict", response_model=schemas.PredictResponse, responses=ERROR_RESPONSES,
            openapi_extra={**_multipart_body("file", many=False), "parameters": [TOP_K_PARAMETER],
                           **PREDICT_SECURITY},
            tags=["predict"],
            summary="Classify one image (multipart field `file`)")
  async def predict(request: Request):
    # top_k is read by hand (documented in TOP_K_PARAMETER): FastAPI's parameter machinery costs
    # more than the rest of the request on this hot path.
    start = time.perf_counter()
    check_api_key(request)
    top_k = parse_top_k(request)
    with holder.use() as model:
      batcher = model.backend.batcher
      if batcher is not None:
        batcher.announce()  # lets the batcher hold a batch open for this request
      submitted = False
      try:
        # Body arrival has its own deadline (408 from the gateway middleware); this one is for work.
        parts = await read_form(request, many=False)
        async with asyncio.timeout(settings.request_timeout_s):
          upload = next((p for p in parts if p.name == "file"), None)
          if upload is None or upload.filename is None:
            raise ApiError(422, "missing_field", "multipart field 'file' with an image file is "
                           "required" + (" (got a text field)" if upload is not None else ""), "file")
          source = f"file {upload.filename!r}" if upload.filename else "file"
          _check_part_type(upload.content_type, source, "file")
          result = await prepare_image_async(upload.data, source, "file", settings, model.bundle,
                                             model.backend.needs_tensor)
          if batcher is not None:
            batcher.withdraw()
            submitted = True
          logits = await run_model(model, [result])
      except TimeoutError:
        raise ApiError(504, "timeout", f"request took longer than {settings.request_timeout_s} s "
                       "(request_timeout_s)") from None
      finally:
        if batcher is not None and not submitted:
          batcher.withdraw()
    probs = softmax(logits[0])
    monitor.record(result.stats, probs)
    metrics.images.labels("ok").inc()
    request.state.images = 1
    return JSONResponse({
        "request_id": rid_of(request), "model": model.ref(),
        "predictions": top_k_predictions(probs, model.bundle.labels, resolve_k(top_k)),
        "image": result.info, "latency_ms": round((time.perf_counter() - start) * 1000, 3)})

  async def predict_many(request: Request, items: list[tuple[str | None, Any]], top_k, model):
    """items: (filename, bytes | ApiError). Bad images become per-item errors."""
    start = time.perf_counter()
    good: list[tuple[int, ImageResult]] = []
    results: list[dict[str, Any]] = []
    for i, (name, payload) in enumerate(items):
      field = f"files[{i}]"
      source = f"{field} {name!r}" if name else field
      try:
        if isinstance(payload, ApiError):
          raise payload
        res = await prepare_image_async(payload, source, field, settings, model.bundle,
                                        model.backend.needs_tensor)
        good.append((i, res))
        results.append({"index": i, "filename": name, "ok": True, "image": res.info})
      except ApiError as e:
        results.append({"index": i, "filename": name, "ok": False, "error": e.detail()})
    if good:
      logits = await run_model(model, [r for _, r in good])
      probs = softmax(logits)
      k = resolve_k(top_k)
      for (i, res), p in zip(good, probs):
        results[i]["predictions"] = top_k_predictions(p, model.bundle.labels, k)
        monitor.record(res.stats, p)
    n_bad = len(items) - len(good)
    metrics.images.labels("ok").inc(len(good))
    metrics.images.labels("error").inc(n_bad)
    request.state.images = len(items)
    return JSONResponse({"request_id": rid_of(request), "model": model.ref(), "results": results,
                         "succeeded": len(good), "failed": n_bad,
                         "latency_ms": round((time.perf_counter() - start) * 1000, 3)})

  @app.post("/v1/predict/batch", response_model=schemas.BatchResponse, responses=ERROR_RESPONSES,
            openapi_extra={**_multipart_body("files", many=True), **PREDICT_SECURITY},
            tags=["predict"],
            summary="Classify many images (repeat multipart field `files`)")
  async def predict_batch(request: Request,
                          top_k: Optional[int] = Query(None, ge=1, le=1000)):
    check_api_key(request)
    with holder.use() as model:
      try:
        # Body arrival has its own deadline (408 from the gateway middleware); this one is for work.
        parts = await read_form(request, many=True)
        async with asyncio.timeout(settings.request_timeout_s):
          uploads = [p for p in parts if p.name == "files"]
          if not uploads:
            raise ApiError(422, "missing_field", "multipart field 'files' (one or more image files) "
                           "is required", "files")
          if len(uploads) > settings.max_batch_files:
            raise ApiError(413, "too_many_files", f"{len(uploads)} files exceeds max_batch_files "
                           f"{settings.max_batch_files}", "files")
          items: list[tuple[str | None, Any]] = []
          for i, up in enumerate(uploads):
            if up.filename is None:
              items.append((None, ApiError(422, "not_a_file", f"files[{i}] is a text field, not a "
                                           "file", f"files[{i}]")))
              continue
            try:
              _check_part_type(up.content_type, f"files[{i}] {up.filename!r}", f"files[{i}]")
              items.append((up.filename, up.data))
            except ApiError as e:
              items.append((up.filename, e))
          return await predict_many(request, items, top_k, model)
      except TimeoutError:
        raise ApiError(504, "timeout", f"request took longer than {settings.request_timeout_s} s")

  def fetch_url(url: str, field: str) -> bytes:
    """GET an allow-listed http(s) URL: no redirects, size and time limits."""
    if not settings.allow_url_fetch:
      raise ApiError(403, "url_fetch_disabled", "URL input is disabled on this server (start it "
                     "with --allow-url-fetch and --url-allowlist)", field)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
      raise ApiError(422, "bad_url", f"{url!r}: only absolute http(s) URLs are accepted", field)
    host = parsed.hostname.lower()
    allowed = any(host == a.lower() or (("://" in a) and url.startswith(a))
                  for a in settings.url_allowlist)
    if not allowed:
      raise ApiError(403, "url_not_allowed", f"host {host!r} is not on the URL allow-list", field)
    request = urllib.request.Request(url, headers={"User-Agent": "jaxclf-serve"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
      with opener.open(request, timeout=settings.url_timeout_s) as resp:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > settings.url_max_bytes:
          raise ApiError(413, "file_too_large", f"{url!r}: {declared} bytes exceeds the URL limit "
                         f"of {settings.url_max_bytes}", field)
        data = resp.read(settings.url_max_bytes + 1)
    except ApiError:
      raise
    except urllib.error.HTTPError as e:
      raise ApiError(422, "url_fetch_failed", f"{url!r}: HTTP {e.code}", field) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
      raise ApiError(422, "url_fetch_failed", f"{url!r}: {e}", field) from None
    if len(data) > settings.url_max_bytes:
      raise ApiError(413, "file_too_large", f"{url!r}: more than {settings.url_max_bytes} bytes",
                     field)
    return data

  @app.post("/v1/predict/json", response_model=schemas.BatchResponse, responses=ERROR_RESPONSES,
            openapi_extra=PREDICT_SECURITY, tags=["predict"],
            summary="Classify images sent as base64 or URLs (JSON)")
  async def predict_json(request: Request, body: schemas.JsonPredictRequest):
    check_api_key(request)
    if len(body.images) > settings.max_batch_files:
      raise ApiError(413, "too_many_files", f"{len(body.images)} images exceeds max_batch_files "
                     f"{settings.max_batch_files}", "images")
    with holder.use() as model:
      try:
        async with asyncio.timeout(settings.request_timeout_s):
          items: list[tuple[str | None, Any]] = []
          for i, im in enumerate(body.images):
            field = f"images[{i}]"
            try:
              if (im.b64 is None) == (im.url is None):
                raise ApiError(422, "invalid_request", f"{field}: give exactly one of 'b64' or "
                               "'url'", field)
              if im.b64 is not None:
                if len(im.b64) > settings.max_upload_bytes * 4 // 3 + 4:
                  raise ApiError(413, "file_too_large", f"{field}: over the per-image limit of "
                                 f"{settings.max_upload_bytes} bytes", field)
                try:
                  data = base64.b64decode(im.b64, validate=True)
                except (binascii.Error, ValueError) as e:
                  raise ApiError(422, "bad_base64", f"{field}.b64: not valid base64 ({e})",
                                 field) from None
              else:
                data = await run_in_threadpool(fetch_url, im.url, field)
              items.append((im.name, data))
            except ApiError as e:
              items.append((im.name, e))
          return await predict_many(request, items, top_k=body.top_k, model=model)
      except TimeoutError:
        raise ApiError(504, "timeout", f"request took longer than {settings.request_timeout_s} s")

  # ------------------------------------------------------------------ model + ops endpoints
  @app.get("/v1/models", response_model=schemas.ModelsResponse, tags=["models"])
  async def list_models():
    models = []
    if holder.current is not None:
      m = holder.current
      b = m.bundle
      models.append({**m.ref(), "sha256": b.sha256, "source": b.source_uri, "classes": b.labels,
                     "input_shape": list(b.spec.input_shape), "preprocessing": b.spec.to_dict(),
                     "has_drift_reference": b.reference is not None, "loaded_at": m.loaded_at})
    return {"models": models, "limits": settings.public_limits()}

  @app.get("/healthz", response_model=schemas.HealthResponse, tags=["ops"])
  async def healthz():
    return {"status": "ok"}

  @app.get("/readyz", response_model=schemas.HealthResponse, tags=["ops"],
           responses={503: {"model": schemas.HealthResponse}})
  async def readyz():
    if holder.current is None:
      return JSONResponse({"status": "loading" if holder.load_error is None else "failed",
                           "detail": holder.load_error}, status_code=503)
    return {"status": "ready", "model": holder.current.ref()}

  @app.get("/metrics", tags=["ops"], response_class=Response,
           responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
  async def prometheus_metrics():
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/monitoring", response_model=schemas.MonitoringResponse, tags=["ops"])
  async def monitoring():
    snap = monitor.snapshot()
    snap = {k: _nan_to_none(v) for k, v in snap.items()}
    snap["model"] = holder.current.ref() if holder.current else None
    return JSONResponse(snap)

  @app.post("/v1/admin/reload", response_model=schemas.ReloadResponse, tags=["admin"],
            openapi_extra={"security": [{"AdminToken": []}]},
            summary="Hot-swap the served model (admin token required)",
            responses={**ERROR_RESPONSES, 403: {"model": schemas.ErrorResponse}})
  async def admin_reload(request: Request, body: schemas.ReloadRequest):
    if not settings.admin_token:
      raise ApiError(403, "admin_disabled", "admin endpoints are disabled: start the server with "
                     "JAXCLF_SERVE_ADMIN_TOKEN set")
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get(
        "x-admin-token", "")
    if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
      raise ApiError(401, "unauthorized", "missing or wrong admin token (Authorization: Bearer "
                     "<token> or X-Admin-Token)")
    async with holder.reload_lock:
      t0 = time.perf_counter()
      try:
        model = await run_in_threadpool(build_model, settings, body.model_path, on_batch)
      except (ModelLoadError, FileNotFoundError) as e:
        metrics.reloads.labels("failed").inc()
        raise ApiError(422, "model_load_failed", str(e), "model_path") from None
      previous = install(model)
      metrics.reloads.labels("ok").inc()
      if previous is not None:
        asyncio.get_running_loop().create_task(retire(previous))
      log.info("model reloaded: %s -> %s", previous.ref() if previous else None, model.ref())
      return {"previous": previous.ref() if previous else model.ref(), "current": model.ref(),
              "load_seconds": round(time.perf_counter() - t0, 3)}

  def openapi_with_security():
    if app.openapi_schema is None:
      from fastapi.openapi.utils import get_openapi
      schema = get_openapi(title=app.title, version=app.version, description=app.description,
                           routes=app.routes)
      schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
      app.openapi_schema = schema
    return app.openapi_schema

  app.openapi = openapi_with_security
  return _wrap(app, settings, metrics, holder)


def _wrap(app: FastAPI, settings: ServeSettings, metrics: Metrics, holder: ModelHolder) -> FastAPI:
  """The gateway middleware goes outermost, so it also sees requests the router rejects."""
  app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics, holder=holder)
  return app


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """A redirect could leave the allow-list; refuse to follow it."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers,
                                 fp)


def _nan_to_none(value: Any) -> Any:
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  return value
