"""The gateway's ASGI middleware: every request passes here before the router sees it.

In order: request id; auth (API key / admin token, from headers only: before any body is read);
503 while draining for shutdown; the body-size limit; admission (bounded in-flight + queue,
429 + Retry-After past both); the body deadline (408 for a trickled body); metrics and one JSON
log line. Plain ASGI rather than BaseHTTPMiddleware: it sits on every request's hot path.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import re
import sys
import time
import uuid

from serving.errors import (ApiError, BodyTimeout, BodyTooLarge, RateLimited, api_error_response,
                            error_response)

access_log = logging.getLogger("jaxclf.serving.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RID_PREFIX = uuid.uuid4().hex[:8]
_RID_COUNTER = itertools.count(1)
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024  # read (and drop) an oversized body up to this, then answer
QUIET_ENDPOINTS = ("/metrics", "/healthz", "/readyz")


class Admission:
  """At most `limit` predict requests run at once and `queue` more wait (FIFO); past both, 429.

  Lives on the event loop (no locks). A slot is handed straight to the next waiter on release,
  so a queued request cannot be overtaken by one that arrives later.
  """

  def __init__(self, limit: int, queue: int):
    self.limit, self.queue = int(limit), int(queue)
    self.active = 0
    self.waiters: collections.deque[asyncio.Future] = collections.deque()

  async def acquire(self, timeout_s: float) -> None:
    if self.active < self.limit and not self.waiters:
      self.active += 1
      return
    if len(self.waiters) >= self.queue:
      raise RateLimited(1.0, f"server busy: {self.active} requests in flight and "
                        f"{len(self.waiters)} queued (max_inflight {self.limit}, max_queue "
                        f"{self.queue}); retry later", code="overloaded")
    fut = asyncio.get_running_loop().create_future()
    self.waiters.append(fut)
    try:
      await asyncio.wait_for(asyncio.shield(fut), timeout_s)
    except BaseException as e:
      if fut.done() and not fut.cancelled():
        self.release()  # the slot arrived just as we gave up: pass it on
      else:
        fut.cancel()
        try:
          self.waiters.remove(fut)
        except ValueError:
          pass
      if isinstance(e, TimeoutError):
        raise RateLimited(1.0, f"server busy: waited {timeout_s} s in the queue for a slot",
                          code="overloaded") from None
      raise

  def release(self) -> None:
    while self.waiters:
      fut = self.waiters.popleft()
      if not fut.done():
        fut.set_result(None)  # the slot moves to this waiter; `active` stays
        return
    self.active -= 1


class GatewayMiddleware:

  def __init__(self, app, gateway, direct: dict | None = None):
    self.app, self.gw, self.settings = app, gateway, gateway.settings
    # (method, path) -> ASGI app served without the router (serving/direct.py); filled by create_app
    self.direct = direct if direct is not None else {}

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
    sender = _Sender(send, (b"x-request-id", rid.encode()), scope, state)
    path = scope["path"]
    gw = self.gw
    gw.inflight += 1
    admitted = False
    try:
      try:
        state["api_key"] = gw.guard.check(path, headers)
        if path.startswith("/v1/predict"):
          if gw.draining:
            raise RateLimited(max(1.0, self.settings.shutdown_delay_s), "the server is shutting "
                              "down; retry on another instance", code="draining", status=503)
          self._check_length(path, headers)
          await gw.admission.acquire(self.settings.request_timeout_s)
          admitted = True
        else:
          self._check_length(path, headers)
      except ApiError as e:
        state["error_code"] = e.code
        if e.status == 413:
          length = headers.get(b"content-length", b"0")
          await _drain(receive, int(length) if length.isdigit() else 0)
        await api_error_response(e, rid)(scope, receive, sender.raw)
        return
      app = self.direct.get((scope["method"], path), self.app) if self.direct else self.app
      await app(scope, _BodyGuard(receive, self._limit(path), start, self.settings, rid, state),
                sender)
    finally:
      if admitted:
        gw.admission.release()
      gw.inflight -= 1
      self._record(scope, state, sender.status, time.perf_counter() - start, rid)

  def _limit(self, path: str) -> int:
    # One image per request there: no reason to accept more than one image's worth of body.
    return (self.settings.max_upload_bytes + 65536 if path == "/v1/predict"
            else self.settings.max_request_bytes)

  def _check_length(self, path: str, headers) -> None:
    length = headers.get(b"content-length")
    if length is None:
      return
    if not length.isdigit():
      raise ApiError(400, "bad_request", "invalid Content-Length header")
    limit = self._limit(path)
    if int(length) > limit:
      raise ApiError(413, "payload_too_large", f"request body of {int(length)} bytes exceeds the "
                     f"limit of {limit} bytes")

  def _record(self, scope, state, status: int, elapsed: float, rid: str) -> None:
    route = scope.get("route")
    endpoint = getattr(route, "path", None) or "unmatched"
    self.gw.metrics.observe_request(endpoint, scope["method"], str(status), elapsed)
    if self.settings.log_requests and endpoint not in QUIET_ENDPOINTS:
      model = self.gw.holder.current
      key = state.get("api_key")
      access_log.info("request", extra={"json": {
          "request_id": rid, "method": scope["method"], "path": scope["path"],
          "endpoint": endpoint, "status": status, "latency_ms": round(elapsed * 1000, 3),
          "client": (scope.get("client") or ("", 0))[0],
          "api_key": key.name if key is not None else None,
          "model_version": model.bundle.version if model else None,
          "images": state.get("images"), "error": state.get("error_code")}})


class _BodyGuard:
  """`receive` with the body-size limit and the body deadline (slowloris); after a cut, the
  response the app makes of it is replaced by `replacement()` (see _Sender)."""

  def __init__(self, receive, limit: int, start: float, settings, rid: str, state: dict):
    self.receive, self.limit, self.settings, self.rid, self.state = (receive, limit, settings,
                                                                     rid, state)
    self.deadline = start + settings.request_timeout_s
    self.received = 0
    self.done = False
    state["body_guard"] = self

  async def __call__(self):
    if self.done:  # after the body: a wait for disconnect, no deadline
      return await self.receive()
    try:
      async with asyncio.timeout_at(asyncio.get_running_loop().time()
                                    + max(0.0, self.deadline - time.perf_counter())):
        message = await self.receive()
    except TimeoutError:
      self.state["cut"] = "slow"
      raise BodyTimeout() from None
    if message["type"] == "http.request":
      self.received += len(message.get("body", b""))
      if not message.get("more_body"):
        self.done = True
      if self.received > self.limit:
        self.state["cut"] = "large"
        raise BodyTooLarge()
    return message

  def replacement(self):
    if self.state.get("cut") == "large":
      return error_response(413, "payload_too_large",
                            f"request body exceeds the limit of {self.limit} bytes", None, self.rid)
    return error_response(408, "request_timeout", "the request body did not arrive within "
                          f"{self.settings.request_timeout_s} s", None, self.rid)


class _Sender:
  """`send` that adds the request id header and records the status; when the body guard cut the
  body, whatever the app made of the cut body is replaced by the reason (413 / 408)."""

  def __init__(self, send, header, scope, state):
    self.send, self.header, self.scope, self.state = send, header, scope, state
    self.status = 500
    self.replaced = False

  async def __call__(self, message):
    if message["type"] == "http.response.start" and self.state.get("cut"):
      self.replaced = True
      await self.state["body_guard"].replacement()(self.scope, None, self.raw)
      return
    if not self.replaced:
      await self.raw(message)

  async def raw(self, message):
    if message["type"] == "http.response.start":
      message["headers"] = list(message.get("headers", [])) + [self.header]
      self.status = message["status"]
    await self.send(message)


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
