"""Who may call what: API keys (each with an optional token bucket) and the admin token.

The gateway middleware calls `Guard.check` with the path and headers before the app reads a byte
of the body, so a caller without a key never gets a JSON body parsed or an upload buffered.

  predict routes (/v1/predict...)   X-API-Key, when any key is configured
  ops routes with --protect-ops     /metrics, /v1/models, /v1/monitoring, /docs, /redoc: the same key
  /v1/admin/...                     Authorization: Bearer <admin token> (or X-Admin-Token)
  /healthz, /readyz, /openapi.json  open (probes; the schema holds no secrets)

401 (with a WWW-Authenticate challenge) when the credential the route needs is missing or wrong,
whatever else the request carries: an API key is not an admin credential, and the admin token is
not an API key. 403 only for a caller who did identify but may not do this: the admin token on a
predict route (admins reload models; they do not spend a client's quota), or an admin token sent
to a server whose admin endpoints are off.

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
# RFC 9110 §11.6.1: a 401 carries a challenge. The API key has no registered scheme; "ApiKey" with
# the header's name is the usual spelling. The admin token is an RFC 6750 bearer token.
KEY_CHALLENGE = 'ApiKey realm="jaxclf", header="X-API-Key"'
ADMIN_REALM = 'Bearer realm="jaxclf-admin"'


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
    found = self.known_key(given)
    if found is None:
      if not given and self._admin_token_ok(headers):
        raise ApiError(403, "forbidden", "the admin token does not reach predict or ops "
                       "endpoints: send a client's X-API-Key")
      raise ApiError(401, "unauthorized", ("wrong" if given else "missing") + " X-API-Key header",
                     headers={"WWW-Authenticate": KEY_CHALLENGE})
    if found.bucket is not None:
      wait = found.bucket.take()
      if wait > 0:
        raise RateLimited(wait, f"API key {found.name!r} is over its rate of "
                          f"{found.bucket.rate:g} requests/s; retry in {wait:.2f} s")
    return found

  def known_key(self, given: bytes) -> ApiKey | None:
    # Compare with every key (no early exit), so timing does not say which prefix matched.
    found = None
    for key in self.keys:
      if hmac.compare_digest(given, key.secret):
        found = key
    return found

  @staticmethod
  def _admin_token(headers: Mapping[bytes, bytes]) -> bytes:
    auth = headers.get(b"authorization", b"")
    return auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-admin-token", b"")

  def _admin_token_ok(self, headers: Mapping[bytes, bytes]) -> bool:
    given = self._admin_token(headers)
    return self.admin is not None and bool(given) and hmac.compare_digest(given, self.admin)

  def _check_admin(self, headers: Mapping[bytes, bytes]) -> None:
    if self._admin_token_ok(headers):
      return
    given = self._admin_token(headers)
    if given and self.admin is None:  # an admin who identified, on a server with admin off
      raise ApiError(403, "admin_disabled", "admin endpoints are disabled: start the server with "
                     "JAXCLF_SERVE_ADMIN_TOKEN set")
    challenge = ADMIN_REALM + (', error="invalid_token"' if given else "")
    off = "" if self.admin is not None else "; admin endpoints are off on this server"
    raise ApiError(401, "unauthorized", ("wrong" if given else "missing") + " admin token "
                   f"(Authorization: Bearer <token> or X-Admin-Token; an API key is not one){off}",
                   headers={"WWW-Authenticate": challenge})
