"""Reading bytes from where users keep images: local paths, file://, http(s)://, s3:// and gs://.

HTTP goes through `HttpFetcher` (stdlib urllib: timeouts, retries with backoff on timeouts,
connection errors, truncated bodies and 408/429/5xx, a concurrency limit shared by all threads,
a size cap). S3 goes through fsspec/s3fs, configured the standard AWS way (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible servers such as MinIO), with
botocore's bounded 'standard' retries (AWS_MAX_ATTEMPTS). GCS goes through
gcsfs with Google's default credentials, or an emulator named by STORAGE_EMULATOR_HOST. Every
reader returns (bytes, None) or (None, reason): a failed download is a reported skip, not a crash;
an object store that stops answering is a DataError naming the URI (skipping every file after it
would silently make a different dataset).
"""
from __future__ import annotations

import http.client
import os
import posixpath
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from jaxclf.data.types import DataError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # one image file larger than this is refused
Reader = Callable[[], "tuple[bytes | None, str | None]"]


def scheme(uri: str) -> str:
  """'' for local paths, else the URL scheme ('s3', 'https', 'file', ...)."""
  if "://" not in uri:
    return ""
  return uri.split("://", 1)[0].lower()


def is_remote(uri: str) -> bool:
  return scheme(uri) not in ("", "file")


def local_path(uri: str) -> str:
  return urllib.parse.unquote(uri[len("file://"):]) if scheme(uri) == "file" else os.path.expanduser(uri)


def join(base: str, rel: str) -> str:
  """Resolves `rel` (a path or URL in a manifest) against the manifest's own location."""
  if scheme(rel) or os.path.isabs(rel):
    return rel
  if scheme(base) in ("http", "https"):
    return urllib.parse.urljoin(base, rel)
  if scheme(base) and scheme(base) != "file":
    return base.rstrip("/") + "/" + rel if base.endswith("/") else posixpath.join(
        posixpath.dirname(base), rel)
  return os.path.join(os.path.dirname(local_path(base)), rel)


class HttpFetcher:
  """GET with timeouts, retries and at most `concurrency` requests in flight (all threads)."""

  RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}

  def __init__(self, timeout: float = 30.0, retries: int = 3, concurrency: int = 8,
               backoff: float = 0.5, max_bytes: int = DEFAULT_MAX_BYTES):
    self.timeout, self.retries, self.backoff, self.max_bytes = timeout, retries, backoff, max_bytes
    self._slots = threading.BoundedSemaphore(concurrency)
    self._lock = threading.Lock()
    self.in_flight = 0
    self.max_in_flight = 0  # observed peak: the concurrency limit is testable
    self.attempts = 0

  def _once(self, url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "jaxclf-ingest"})
    with self._slots:
      with self._lock:
        self.in_flight += 1
        self.attempts += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
      try:
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
          length = r.headers.get("Content-Length")
          if length is not None and int(length) > self.max_bytes:
            raise _Fatal(f"{length} bytes is over the {self.max_bytes}-byte limit")
          data = r.read(self.max_bytes + 1)
          if len(data) > self.max_bytes:
            raise _Fatal(f"body is over the {self.max_bytes}-byte limit")
          if length is not None and len(data) != int(length):
            raise http.client.IncompleteRead(data, int(length) - len(data))
          return data
      finally:
        with self._lock:
          self.in_flight -= 1

  def get(self, url: str) -> tuple[bytes | None, str | None]:
    last = ""
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1))
      try:
        return self._once(url), None
      except _Fatal as e:
        return None, str(e)
      except urllib.error.HTTPError as e:
        last = f"HTTP {e.code} {e.reason}"
        if e.code not in self.RETRY_STATUS:
          return None, last
      except http.client.IncompleteRead as e:
        last = f"truncated body ({len(e.partial)} bytes, {e.expected} missing)"
      except (TimeoutError, socket.timeout) as e:
        last = f"timed out after {self.timeout} s ({type(e).__name__})"
      except urllib.error.URLError as e:
        reason = e.reason
        last = (f"timed out after {self.timeout} s" if isinstance(reason, (TimeoutError, socket.timeout))
                else f"connection failed ({reason})")
      except (ConnectionError, http.client.HTTPException, OSError) as e:
        last = f"connection failed ({type(e).__name__}: {e})"
    return None, f"{last}; gave up after {self.retries + 1} attempts"


class _Fatal(Exception):
  """Not worth retrying."""


S3_MAX_ATTEMPTS = 5  # botocore's default for its 'standard' retry mode


def s3_max_attempts() -> int:
  return int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)


def s3_options() -> dict:
  """fsspec storage options for s3fs: the standard AWS configuration (env, ~/.aws;
  AWS_ENDPOINT_URL honoured) and one bounded retry policy, botocore's own: mode 'standard'
  (connection errors, timeouts, throttling and 5xx retried with exponential backoff and jitter,
  up to 20 s apart), AWS_MAX_ATTEMPTS attempts in all (default 5), as botocore reads it."""
  kw = {}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    kw["endpoint_url"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    kw["region_name"] = region
  retries = {"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
             "max_attempts": s3_max_attempts()}
  # skip_instance_cache: fsspec caches filesystems by arguments, not by environment; a changed
  # endpoint or credentials must take effect.
  return {"client_kwargs": kw, "config_kwargs": {"retries": retries, "connect_timeout": 10},
          "skip_instance_cache": True}


def s3_filesystem():
  """s3fs configured by s3_options()."""
  try:
    import s3fs  # noqa: PLC0415 - optional edge dependency
  except ImportError:
    raise DataError("s3:// needs the s3fs package: pip install -r requirements/data.txt") from None
  fs = s3fs.S3FileSystem(**s3_options())
  # s3fs retries some errors itself, on top of botocore's attempts; one policy, not two nested.
  fs.retries = 1
  return fs


def unreachable(e: BaseException) -> bool:
  """The object store itself did not answer (refused, reset, timed out) after the client's own
  retries, as opposed to an answer about this object (missing, forbidden)."""
  kinds: list[type] = [ConnectionError, TimeoutError]
  try:
    import botocore.exceptions as be  # noqa: PLC0415
    kinds += [be.ConnectionError, be.HTTPClientError]
  except ImportError:
    pass
  try:
    import aiohttp  # noqa: PLC0415
    kinds += [aiohttp.ClientConnectionError]
  except ImportError:
    pass
  return isinstance(e, tuple(kinds))


_UNREACHABLE_END = "Rerun the same command when it is back"


def store_unreachable(uri: str, e: BaseException, doing: str = "read") -> DataError:
  """One line for a lost object store: the URI, what failed, and how often it was tried."""
  return DataError(f"{uri}: the object store did not answer the {doing} ({type(e).__name__}: "
                   f"{e}); {gave_up(uri)}. {_UNREACHABLE_END}")


def gave_up(uri: str) -> str:
  """Which client retried, and how many attempts it made, for `uri`'s store."""
  if scheme(uri) == "s3":
    return f"gave up after {s3_max_attempts()} attempts (botocore 'standard' retries)"
  return f"gave up after {_gcsfs_attempts()} attempts (gcsfs's retries)"


def _gcsfs_attempts() -> int | str:
  """gcsfs's fixed schedule: `retries` attempts with exponential backoff (1, 2, 4, 8, 16 s plus
  jitter), bound when gcsfs is imported; it takes no per-filesystem setting."""
  try:
    import gcsfs.core  # noqa: PLC0415
    return int(gcsfs.core.GCSFileSystem.retries)
  except (ImportError, AttributeError, TypeError, ValueError):
    return "the client's"


def store_unreachable_in(text: str) -> str | None:
  """store_unreachable's line inside the text a distributed runner (Beam) wraps a worker's error
  in, so that the driver can report it as the one line it was."""
  found = re.search(r"((?:s3|gs)://\S+: the object store did not answer .*?" +
                    re.escape(_UNREACHABLE_END) + ")", text, re.S)
  return found.group(1) if found else None


def gcs_filesystem():
  """gcsfs with Google's default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata),
  or, with STORAGE_EMULATOR_HOST set (a local GCS emulator), anonymous and JSON API only."""
  try:
    import gcsfs  # noqa: PLC0415 - optional edge dependency
    import gcsfs.core  # noqa: PLC0415
  except ImportError:
    raise DataError("gs:// needs the gcsfs package: pip install -r requirements/data.txt "
                    "(.venv and .venv-beam have it)") from None
  if os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
    # An emulator takes no credentials: token='anon' skips Google's default-credential chain,
    # which would ask the GCE metadata server. gcsfs.GCSFileSystem is the extended class that
    # first asks the bucket's layout over gRPC (storage-control), which emulators do not serve
    # (each call waits out a 60 s timeout), so use the plain JSON-API class.
    return gcsfs.core.GCSFileSystem(token="anon", skip_instance_cache=True)
  return gcsfs.GCSFileSystem(skip_instance_cache=True)


def object_path(uri: str) -> str:
  """bucket/key of an s3:// or gs:// URI (what fsspec filesystems take)."""
  return uri.split("://", 1)[1] if scheme(uri) in ("s3", "gs") else uri


def strip_s3(uri: str) -> str:
  return uri[len("s3://"):] if uri.startswith("s3://") else uri


class Opener:
  """Makes readers for URIs. Shares one HttpFetcher and one S3 filesystem per ingest."""

  def __init__(self, http: HttpFetcher | None = None):
    self.http = http or HttpFetcher()
    self._s3 = None
    self._s3_lock = threading.Lock()

  @property
  def s3(self):
    with self._s3_lock:
      if self._s3 is None:
        self._s3 = s3_filesystem()
      return self._s3

  def object_store(self, uri: str):
    """(fsspec filesystem, bucket/key path) for an s3:// or gs:// URI."""
    sch = scheme(uri)
    if sch == "s3":
      return self.s3, strip_s3(uri)
    if sch == "gs":
      with self._s3_lock:
        if getattr(self, "_gcs", None) is None:
          self._gcs = gcs_filesystem()
      return self._gcs, object_path(uri)
    raise DataError(f"{uri!r}: not an object-store URI (s3:// or gs://)")

  def read(self, uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes | None, str | None]:
    sch = scheme(uri)
    if sch in ("", "file"):
      path = local_path(uri)
      try:
        if os.path.getsize(path) > max_bytes:
          return None, f"file is over the {max_bytes}-byte limit"
        with open(path, "rb") as f:
          return f.read(), None
      except OSError as e:
        return None, f"cannot read file ({type(e).__name__}: {e.strerror or e})"
    if sch in ("http", "https"):
      return self.http.get(uri)
    if sch in ("s3", "gs"):
      try:
        fs, path = self.object_store(uri)
        return fs.cat_file(path), None
      except FileNotFoundError:
        return None, f"no such {sch.upper()} object"
      except DataError as e:
        return None, str(e)
      except Exception as e:  # noqa: BLE001 - botocore/gcsfs raise many types
        if unreachable(e):  # not this file's fault: skipping it would change the dataset
          raise store_unreachable(uri, e) from None
        return None, f"{sch.upper()} read failed ({type(e).__name__}: {e})"
    return None, f"unsupported URI scheme {sch!r}"

  def reader(self, uri: str) -> Reader:
    return lambda: self.read(uri)

  def read_or_raise(self, uri: str, what: str) -> bytes:
    """For files that must exist (a manifest, an archive): a missing one is a DataError."""
    data, err = self.read(uri, max_bytes=1 << 40)
    if data is None:
      raise DataError(f"{what} {uri!r}: {err}")
    return data

  def list_objects(self, prefix: str) -> list[tuple[str, int]]:
    """All objects under s3://bucket/prefix/ or gs://bucket/prefix/ as (key relative to the
    prefix, size). (A bare bucket/prefix is read as s3, as before gs:// existed.)"""
    try:
      fs, root = self.object_store(prefix if scheme(prefix) else f"s3://{prefix}")
      root = root.rstrip("/")
      found = fs.find(root, detail=True)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001
      if unreachable(e):
        raise store_unreachable(prefix, e, "listing") from None
      raise DataError(f"cannot list {prefix!r}: {type(e).__name__}: {e}") from None
    out = []
    for key, info in sorted(found.items()):
      if info.get("type") == "directory" or key.endswith("/"):
        continue
      out.append((key[len(root) + 1:], int(info.get("size") or 0)))
    return out

  list_s3 = list_objects  # the older name (serving's predict CLI uses it)


def download(opener: Opener, uri: str, dest: str) -> None:
  """Streams `uri` into `dest` (via a temp name, renamed when complete). Raises DataError."""
  tmp = f"{dest}.part-{os.getpid()}"
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  sch = scheme(uri)
  try:
    if sch in ("", "file"):
      with open(local_path(uri), "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
          out.write(chunk)
    elif sch in ("s3", "gs"):
      fs, path = opener.object_store(uri)
      fs.get_file(path, tmp)
    elif sch in ("http", "https"):
      _download_http(opener.http, uri, tmp)
    else:
      raise DataError(f"unsupported URI scheme {sch!r} in {uri!r}")
  except DataError:
    _unlink(tmp)
    raise
  except Exception as e:  # noqa: BLE001
    _unlink(tmp)
    if unreachable(e):
      raise store_unreachable(uri, e, "download") from None
    raise DataError(f"cannot download {uri!r}: {type(e).__name__}: {e}") from None
  os.replace(tmp, dest)


def _download_http(fetcher: HttpFetcher, url: str, tmp: str) -> None:
  last = ""
  for attempt in range(fetcher.retries + 1):
    if attempt:
      time.sleep(fetcher.backoff * 2 ** (attempt - 1))
    try:
      req = urllib.request.Request(url, headers={"User-Agent": "jaxclf-ingest"})
      with fetcher._slots, urllib.request.urlopen(req, timeout=fetcher.timeout) as r, \
          open(tmp, "wb") as out:
        length = r.headers.get("Content-Length")
        n = 0
        while chunk := r.read(1 << 20):
          n += len(chunk)
          out.write(chunk)
        if length is not None and n != int(length):
          raise http.client.IncompleteRead(b"", int(length) - n)
      return
    except urllib.error.HTTPError as e:
      last = f"HTTP {e.code} {e.reason}"
      if e.code not in HttpFetcher.RETRY_STATUS:
        break
    except (http.client.HTTPException, urllib.error.URLError, OSError) as e:
      last = f"{type(e).__name__}: {e}"
  raise DataError(f"cannot download {url!r}: {last}")


def _unlink(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass
