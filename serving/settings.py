"""Gateway settings: one dataclass, filled from defaults < environment (JAXCLF_SERVE_*) < CLI flags.

Every limit the gateway enforces lives here, so the limits a deployment runs with are visible in
one place (and in GET /v1/models -> "limits").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

ENV_PREFIX = "JAXCLF_SERVE_"

# PSI above this on any monitored feature raises the drift alert (jaxclf_drift_alert == 1).
# 0.1 / 0.25 are the usual "watch" / "act" levels for the population stability index.
DEFAULT_DRIFT_THRESHOLD = 0.25


@dataclasses.dataclass
class ServeSettings:
  # what to serve
  model_path: str | None = None  # export dir, .../model.onnx, or registry:NAME@stage|version
  backend: str = "onnx"  # "onnx" (onnxruntime in-process) | "triton"
  triton_url: str = "localhost:8001"
  triton_protocol: str = "grpc"  # "grpc" | "http"
  triton_model: str | None = None  # the bytes-in ensemble, e.g. "fashion_image"
  triton_timeout_s: float = 10.0
  # where
  host: str = "127.0.0.1"
  port: int = 8000
  # limits
  max_upload_bytes: int = 10 * 1024 * 1024  # one image
  max_request_bytes: int = 32 * 1024 * 1024  # a whole request body (batch of images)
  max_batch_files: int = 64
  # 16 M pixels: a 4k x 4k photo decodes; a 50k x 50k "bomb" header is refused before allocation.
  max_pixels: int = 16_000_000
  request_timeout_s: float = 10.0
  top_k: int = 5
  # auth: predict needs X-API-Key when any key is set; /v1/admin/* always needs admin_token.
  # Keys come from api_key (one), api_keys (JAXCLF_SERVE_API_KEYS, comma-separated) and
  # api_keys_file (lines "name key [rate_per_s [burst]]"); see serving/auth.py.
  api_key: str | None = None
  api_keys: tuple[str, ...] = ()
  api_keys_file: str | None = None
  api_key_rate_per_s: float = 0.0  # token bucket for keys without their own; 0 = unlimited
  api_key_burst: int = 0  # bucket size; 0 = max(1, rate)
  protect_ops: bool = False  # /metrics, /v1/models, /v1/monitoring, /docs need the key too
  admin_token: str | None = None
  # load shedding: predict requests past max_inflight wait in a queue of max_queue; past both,
  # 429 + Retry-After. On SIGTERM the server drains: 503 to new work, in-flight ones finish.
  max_inflight: int = 64
  max_queue: int = 256
  shutdown_delay_s: float = 0.0  # keep answering 503 / readyz 503 this long before closing
  drain_timeout_s: float = 30.0  # longest wait for in-flight requests after SIGTERM
  # integrity: refuse an export with no recorded sha256 for model.onnx unless this is set
  allow_unverified: bool = False
  # onnxruntime + micro-batching
  micro_batching: bool = True
  max_batch_size: int = 32
  max_wait_ms: float = 2.0
  intra_op_threads: int = 0  # 0 = usable cores - 1 (see ort_threads)
  # Batches the model runs in under this many microseconds (measured at warm-up) run on the event
  # loop instead of the model thread: cheaper than the thread hand-off. 0 = always the thread.
  inline_budget_us: float = 150.0
  # the hot path (bench/serve.py measures each as a lever):
  predict_fast_path: bool = True  # POST /v1/predict past the FastAPI router (serving/direct.py)
  # Images up to this many pixels (and 256 KiB) decode on the event loop, cheaper than a thread
  # hop; bigger ones in the thread pool. 0 = every image in the thread pool.
  inline_decode_pixels: int = 512 * 512
  warmup_runs: int = 3
  # Gateway processes on the one port (SO_REUSEPORT), each with its own event loop and model copy
  # (serving/server.py: /metrics, drift window and admission limits are then per worker).
  workers: int = 1
  # sys.setswitchinterval: how long the model thread may wait for the GIL the busy event loop
  # holds, when a batch comes back from onnxruntime. 0 = Python's default (5 ms).
  gil_switch_interval_ms: float = 0.0
  # JSON input by URL: off unless allowed, and then only to listed hosts
  allow_url_fetch: bool = False
  # Entries: a host ("images.example.com", any http(s) path) or scheme://host[:port]/path-prefix.
  url_allowlist: tuple[str, ...] = ()
  url_allow_private: bool = False  # also fetch from private, loopback, link-local... addresses
  url_resolve: tuple[str, ...] = ()  # "host=ip" pins, like curl --resolve (tests, split DNS)
  url_max_bytes: int = 10 * 1024 * 1024
  url_timeout_s: float = 5.0
  # monitoring
  monitor_window: int = 1000  # requests kept in the rolling window
  drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
  drift_min_samples: int = 50  # PSI on fewer samples is noise; gauges read NaN until then
  low_confidence_threshold: float = 0.5
  log_requests: bool = True
  otel_telemetry: bool = False  # FastAPI's native OpenTelemetry spans/metrics (with an OTel provider)

  def __post_init__(self):
    if self.backend not in ("onnx", "triton"):
      raise ValueError(f"backend must be 'onnx' or 'triton', got {self.backend!r}")
    if self.triton_protocol not in ("grpc", "http"):
      raise ValueError(f"triton_protocol must be 'grpc' or 'http', got {self.triton_protocol!r}")
    for name in ("max_upload_bytes", "max_request_bytes", "max_batch_files", "max_pixels", "top_k",
                 "max_batch_size", "monitor_window", "drift_min_samples", "max_inflight",
                 "workers"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.request_timeout_s <= 0 or self.max_wait_ms < 0:
      raise ValueError("request_timeout_s must be > 0 and max_wait_ms >= 0")
    if not 0 < self.low_confidence_threshold < 1:
      raise ValueError("low_confidence_threshold must be in (0, 1)")
    for name in ("url_allowlist", "api_keys", "url_resolve"):
      if isinstance(getattr(self, name), str):
        setattr(self, name, tuple(s.strip() for s in getattr(self, name).split(",") if s.strip()))
    if (self.max_queue < 0 or self.api_key_rate_per_s < 0 or self.shutdown_delay_s < 0
        or self.inline_decode_pixels < 0 or self.gil_switch_interval_ms < 0):
      raise ValueError("max_queue, api_key_rate_per_s, shutdown_delay_s, inline_decode_pixels "
                       "and gil_switch_interval_ms must be >= 0")
    # The ops routes are protected by the API key: with no key at all, --protect-ops would
    # leave them as open as without it, so it is refused rather than accepted and ignored.
    if self.protect_ops and not (self.api_key or self.api_keys or self.api_keys_file):
      raise ValueError("protect_ops (--protect-ops, JAXCLF_SERVE_PROTECT_OPS) needs an API key: "
                       "set JAXCLF_SERVE_API_KEY, JAXCLF_SERVE_API_KEYS or --api-keys-file")

  def ort_threads(self) -> int:
    """onnxruntime intra-op threads per worker: the usable cores left once each worker's event loop
    (HTTP, multipart, decode: GIL-bound Python) has one, shared by the workers; at least one."""
    if self.intra_op_threads > 0:
      return self.intra_op_threads
    try:
      cores = len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:  # not Linux
      cores = os.cpu_count() or 1
    return max(1, (cores - self.workers) // self.workers)

  def public_limits(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in (
        "max_upload_bytes", "max_request_bytes", "max_batch_files", "max_pixels",
        "request_timeout_s", "top_k", "allow_url_fetch", "url_max_bytes", "url_timeout_s",
        "max_inflight", "max_queue", "workers")}


def _parse(field: dataclasses.Field, text: str) -> Any:
  kind = str(field.type)
  if "bool" in kind:
    if text.lower() in ("1", "true", "yes", "on"):
      return True
    if text.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"{ENV_PREFIX}{field.name.upper()}: expected true/false, got {text!r}")
  if "tuple" in kind:
    return tuple(s.strip() for s in text.split(",") if s.strip())
  try:
    if kind.startswith("int"):
      return int(text)
    if kind.startswith("float"):
      return float(text)
  except ValueError:
    raise ValueError(f"{ENV_PREFIX}{field.name.upper()}: expected a number, got {text!r}") from None
  return text


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> ServeSettings:
  """Defaults, then JAXCLF_SERVE_<FIELD> environment variables, then non-None `overrides`."""
  env = os.environ if environ is None else environ
  values: dict[str, Any] = {}
  for field in dataclasses.fields(ServeSettings):
    key = ENV_PREFIX + field.name.upper()
    if key in env and env[key] != "":
      values[field.name] = _parse(field, env[key])
  known = {f.name for f in dataclasses.fields(ServeSettings)}
  for k, v in (overrides or {}).items():
    if k not in known:
      raise ValueError(f"unknown serve setting {k!r}")
    if v is not None:
      values[k] = v
  return ServeSettings(**values)
