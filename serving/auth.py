"""Who may call what: API keys (each with an optional token bucket) and the admin token.

The gateway middleware calls `Guard.check` with the path and headers before the app reads a byte
of the body, so a caller without a key never gets a JSON body parsed or an upload buffered.

  predict routes (/v1/predict...)   X-API-Key, when any key is configured
  ops routes with --protect-ops     /metrics, /v1/models, /v1/monitoring, /docs, /redoc: the same key
  /v1/admin/...                     Authorization: Bearer <admin token> (or X-Admin-Token); 403 when
                                    the server has no admin token
  /healthz, /readyz, /openapi.json  open (probes; the schema holds no secrets)

Keys come from JAXCLF_SERVE_API_KEY (one), JAXCLF_SERVE_API_KEYS (comma-separated) and a keys file
(--api-keys-file), one key a line:

  # name     key                 rate_per_s  burst
  mobile     k-9f2c...           20          40
  batch-job  k-71aa...                                 <- unlimited, or the default bucket

A key without its own rate gets --api-key-rate-per-s / --api-key-burst (0 = unlimited).
"""
from __future__ import annotations

import dataclasses
import hmac
import math
import threading
import time
from typing import Mapping

from serving.errors import ApiError, RateLimited
from serving.settings import ServeSettings

PREDICT_PREFIX = "/v1/predict"
ADMIN_PREFIX = "/v1/admin/"
OPS_PATHS = ("/metrics", "/v1/models", "/v1/monitoring", "/docs", "/docs/oauth2-redirect", "/redoc")


class TokenBucket:
  """`rate` tokens a second, at most `burst` saved up. Thread-safe; one per key."""

  def __init__(self, rate: float, burst: float):
    self.rate, self.burst = float(rate), float(burst)
    self.tokens = self.burst
    self.stamp = time.monotonic()
    self._lock = threading.Lock()

  def take(self) -> float:
    """0.0 when a token was taken, else the seconds until the next one."""
    with self._lock:
      now = time.monotonic()
      self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
      self.stamp = now
      if self.tokens >= 1.0:
        self.tokens -= 1.0
        return 0.0
      return (1.0 - self.tokens) / self.rate


@dataclasses.dataclass
class ApiKey:
  name: str
  secret: bytes
  bucket: TokenBucket | None = None


def _bucket(rate: float, burst: float) -> TokenBucket | None:
  return TokenBucket(rate, burst or max(1.0, rate)) if rate > 0 else None


def read_keys_file(path: str, default_rate: float = 0.0, default_burst: float = 0.0) -> list[ApiKey]:
  """Lines "name key [rate_per_s [burst]]"; '#' starts a comment. Errors name the file and line."""
  keys = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise ValueError(f"api_keys_file {path}: cannot read it ({e.strerror})") from None
  for n, line in enumerate(lines, 1):
    words = line.split("#", 1)[0].split()
    if not words:
      continue
    if not 2 <= len(words) <= 4:
      raise ValueError(f"{path}:{n}: expected 'name key [rate_per_s [burst]]', got {len(words)} "
                       "fields")
    try:
      rate = float(words[2]) if len(words) > 2 else default_rate
      burst = float(words[3]) if len(words) > 3 else (default_burst if len(words) < 3 else 0.0)
    except ValueError:
      raise ValueError(f"{path}:{n}: rate_per_s and burst must be numbers") from None
    if rate < 0 or burst < 0 or not math.isfinite(rate):
      raise ValueError(f"{path}:{n}: rate_per_s and burst must be >= 0")
    keys.append(ApiKey(words[0], words[1].encode(), _bucket(rate, burst)))
  if not keys:
    raise ValueError(f"api_keys_file {path}: no keys in it")
  return keys


def load_keys(settings: ServeSettings) -> list[ApiKey]:
  rate, burst = settings.api_key_rate_per_s, settings.api_key_burst
  keys = [ApiKey(f"env-{i}", k.encode(), _bucket(rate, burst))
          for i, k in enumerate(([settings.api_key] if settings.api_key else [])
                                + list(settings.api_keys))]
  if settings.api_keys_file:
    keys += read_keys_file(settings.api_keys_file, rate, burst)
  names = [k.name for k in keys]
  if len(set(names)) != len(names):
    raise ValueError(f"API key names must be unique, got {sorted(names)}")
  return keys


class Guard:
  """Decides, from the path and headers alone, whether a request may proceed."""

  def __init__(self, settings: ServeSettings, keys: list[ApiKey] | None = None):
    self.settings = settings
    self.keys = load_keys(settings) if keys is None else keys
    self.admin = settings.admin_token.encode() if settings.admin_token else None

  def needs_key(self, path: str) -> bool:
    if not self.keys:
      return False
    return path.startswith(PREDICT_PREFIX) or (self.settings.protect_ops and path in OPS_PATHS)

  def check(self, path: str, headers: Mapping[bytes, bytes]) -> ApiKey | None:
    """The caller's key (None when the route needs none); raises ApiError 401/403/429."""
    if path.startswith(ADMIN_PREFIX):
      self._check_admin(headers)
      return None
    if not self.needs_key(path):
      return None
    given = headers.get(b"x-api-key", b"")
    # Compare with every key (no early exit), so timing does not say which prefix matched.
    found = None
    for key in self.keys:
      if hmac.compare_digest(given, key.secret):
        found = key
    if found is None:
      raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")
    if found.bucket is not None:
      wait = found.bucket.take()
      if wait > 0:
        raise RateLimited(wait, f"API key {found.name!r} is over its rate of "
                          f"{found.bucket.rate:g} requests/s; retry in {wait:.2f} s")
    return found

  def _check_admin(self, headers: Mapping[bytes, bytes]) -> None:
    if self.admin is None:
      raise ApiError(403, "admin_disabled", "admin endpoints are disabled: start the server with "
                     "JAXCLF_SERVE_ADMIN_TOKEN set")
    auth = headers.get(b"authorization", b"")
    given = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-admin-token", b"")
    if not hmac.compare_digest(given, self.admin):
      raise ApiError(401, "unauthorized", "missing or wrong admin token (Authorization: Bearer "
                     "<token> or X-Admin-Token)")

