"""URL input for /v1/predict/json, safe to expose: `UrlFetcher(settings).fetch(url, field)`.

Off unless --allow-url-fetch, and then:
  - the URL must match an allow-list entry, parsed (not string-prefixed) as
      host                              "img.example.com": http or https, any port, any path
      scheme://host[:port][/path/prefix] "https://img.example.com/pub/": that scheme, host and
                                        port, and a path under the prefix at a '/' boundary
    so "https://img.example.com" never admits "https://img.example.com.evil.net/", and
    user-info ("https://img.example.com@evil.net/") is refused outright;
  - the host is resolved once, and every address it resolves to must be public: private,
    loopback, link-local (169.254.169.254, the cloud metadata service), multicast, reserved,
    unspecified and shared (100.64/10) addresses are refused unless --url-allow-private;
  - the connection goes to the address that was checked (no second lookup, so no DNS-rebinding
    window); https still sends SNI and verifies the certificate for the host name, and the Host
    header is the name from the URL;
  - one deadline (url_timeout_s) covers connect, headers and body together: a watchdog closes
    the socket when it passes, so a server that trickles a byte at a time cannot hold a thread;
  - at most url_max_bytes are read; redirects are refused, not followed.

`resolver` and `connector` are injectable: tests pin names to addresses (like curl --resolve, also
`--url-resolve host=ip`) and route a checked public address to a local test server.
"""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Sequence

from serving.errors import ApiError
from serving.settings import ServeSettings

Resolver = Callable[[str, int], Sequence[str]]
Connector = Callable[[str, int, float], socket.socket]
DEFAULT_PORTS = {"http": 80, "https": 443}
READ_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class AllowRule:
  schemes: tuple[str, ...]
  host: str
  port: int | None  # None: any port (a bare host entry)
  path_prefix: str  # "" = any path

  def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
    if scheme not in self.schemes or host != self.host:
      return False
    if self.port is not None and port != self.port:
      return False
    prefix = self.path_prefix
    if not prefix or prefix == "/":
      return True
    return path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/")


def parse_allow_rule(entry: str) -> AllowRule:
  """One allow-list entry -> AllowRule; a ValueError names the entry."""
  text = entry.strip()
  if "://" not in text:
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text  # [IPv6]
    if not host or any(c in host for c in "/@?#") or (":" in host and host == text):
      raise ValueError(f"url_allowlist entry {entry!r}: a bare entry is a host name; write "
                       "scheme://host[:port]/path for anything more")
    return AllowRule(("http", "https"), host.lower().rstrip("."), None, "")
  parts = urllib.parse.urlsplit(text)
  if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None \
      or parts.query or parts.fragment:
    raise ValueError(f"url_allowlist entry {entry!r}: expected http(s)://host[:port][/path]")
  try:
    port = parts.port
  except ValueError:
    raise ValueError(f"url_allowlist entry {entry!r}: bad port") from None
  # A URL entry names one origin: without a port, the scheme's default.
  return AllowRule((parts.scheme,), parts.hostname.lower().rstrip("."),
                   port or DEFAULT_PORTS[parts.scheme], parts.path)


def address_problem(ip: str) -> str | None:
  """Why an address must not be fetched from (None when it is a public unicast address)."""
  addr = ipaddress.ip_address(ip.split("%", 1)[0])
  if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
    addr = addr.ipv4_mapped
  for attr, why in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                    ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                    ("is_private", "private"), ("is_reserved", "reserved")):
    if getattr(addr, attr):
      return why
  if not addr.is_global:
    return "not globally routable"
  return None


def system_resolver(host: str, port: int) -> list[str]:
  infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  return list(dict.fromkeys(info[4][0] for info in infos))


def pinned_resolver(pins: Sequence[str], fallback: Resolver = system_resolver) -> Resolver:
  """'host=ip' entries answer for their host; other names go to `fallback`."""
  table: dict[str, list[str]] = {}
  for pin in pins:
    host, sep, ip = pin.partition("=")
    if not sep:
      raise ValueError(f"url_resolve entry {pin!r}: expected host=ip")
    ipaddress.ip_address(ip.strip())  # ValueError names a bad address
    table.setdefault(host.strip().lower(), []).append(ip.strip())

  def resolve(host: str, port: int) -> Sequence[str]:
    return table.get(host) or fallback(host, port)
  return resolve


def direct_connector(ip: str, port: int, timeout: float) -> socket.socket:
  return socket.create_connection((ip, port), timeout=timeout)


class _PinnedConnection(http.client.HTTPConnection):
  """http.client keeps the URL's host for the Host header; the socket comes from `sock`."""

  def __init__(self, host: str, port: int, sock: socket.socket, timeout: float):
    super().__init__(host, port, timeout=timeout)
    self.sock = sock

  def connect(self):  # already connected to the checked address
    pass


class UrlFetcher:

  def __init__(self, settings: ServeSettings, *, resolver: Resolver | None = None,
               connector: Connector = direct_connector,
               ssl_context: ssl.SSLContext | None = None):
    self.settings = settings
    self.rules = [parse_allow_rule(e) for e in settings.url_allowlist]
    self.resolver = resolver or pinned_resolver(settings.url_resolve)
    self.connector = connector
    self.ssl_context = ssl_context or ssl.create_default_context()

  def check_url(self, url: str, field: str) -> tuple[urllib.parse.SplitResult, int]:
    s = self.settings
    if not s.allow_url_fetch:
      raise ApiError(403, "url_fetch_disabled", "URL input is disabled on this server (start it "
                     "with --allow-url-fetch and --url-allowlist)", field)
    parts = urllib.parse.urlsplit(url)
    try:
      port = parts.port
    except ValueError:
      raise ApiError(422, "bad_url", f"{url!r}: bad port", field) from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
      raise ApiError(422, "bad_url", f"{url!r}: only absolute http(s) URLs are accepted", field)
    if parts.username is not None or parts.password is not None:
      raise ApiError(422, "bad_url", f"{url!r}: user-info ('user@host') is not accepted", field)
    host = parts.hostname.lower().rstrip(".")
    port = port or DEFAULT_PORTS[parts.scheme]
    path = parts.path or "/"
    if any(seg in (".", "..") for seg in urllib.parse.unquote(path).split("/")):
      raise ApiError(422, "bad_url", f"{url!r}: '.' and '..' path segments are not accepted", field)
    if not any(r.matches(parts.scheme, host, port, urllib.parse.unquote(path)) for r in self.rules):
      raise ApiError(403, "url_not_allowed", f"{parts.scheme}://{host}:{port}{path} is not on the "
                     "URL allow-list", field)
    return parts, port

  def resolve_checked(self, host: str, port: int, url: str, field: str) -> list[str]:
    try:
      ipaddress.ip_address(host.strip("[]"))
      addresses = [host.strip("[]")]
    except ValueError:
      try:
        addresses = list(self.resolver(host, port))
      except (OSError, UnicodeError) as e:
        raise ApiError(422, "url_fetch_failed", f"{url!r}: cannot resolve {host!r} ({e})",
                       field) from None
    if not addresses:
      raise ApiError(422, "url_fetch_failed", f"{url!r}: {host!r} resolves to no address", field)
    if not self.settings.url_allow_private:
      for ip in addresses:  # one bad address refuses the name: no picking among them
        why = address_problem(ip)
        if why:
          raise ApiError(403, "url_blocked", f"{url!r}: {host} resolves to {ip}, a {why} address; "
                         "URL fetch only reaches public addresses (server flag "
                         "--url-allow-private lifts this)", field)
    return addresses

  def fetch(self, url: str, field: str) -> bytes:
    """GET `url` under every rule above; ApiError (4xx) for anything wrong."""
    deadline = time.monotonic() + self.settings.url_timeout_s
    parts, port = self.check_url(url, field)
    host = parts.hostname.lower().rstrip(".")
    addresses = self.resolve_checked(host, port, url, field)
    sock = self._connect(addresses, port, deadline, url, field)
    # The watchdog: whatever the socket is blocked in when the deadline passes, it fails.
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shutdown, (sock,))
    watchdog.daemon = True
    watchdog.start()
    try:
      if parts.scheme == "https":
        sock = self.ssl_context.wrap_socket(sock, server_hostname=host)  # SNI + cert for `host`
        watchdog.args = (sock,)
      return self._get(sock, host, port, parts, deadline, url, field)
    except ApiError:
      raise
    except (OSError, http.client.HTTPException, ValueError) as e:
      if time.monotonic() >= deadline:
        raise ApiError(422, "url_timeout", f"{url!r}: not fetched within "
                       f"{self.settings.url_timeout_s} s (url_timeout_s)", field) from None
      raise ApiError(422, "url_fetch_failed", f"{url!r}: {type(e).__name__}: {e}", field) from None
    finally:
      watchdog.cancel()
      sock.close()

  def _connect(self, addresses: Sequence[str], port: int, deadline: float, url: str,
               field: str) -> socket.socket:
    error: Exception | None = None
    for ip in addresses:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      try:
        return self.connector(ip, port, remaining)
      except OSError as e:
        error = e
    raise ApiError(422, "url_fetch_failed", f"{url!r}: cannot connect ({error or 'timed out'})",
                   field)

  def _get(self, sock, host: str, port: int, parts, deadline: float, url: str,
           field: str) -> bytes:
    limit = self.settings.url_max_bytes
    default = DEFAULT_PORTS[parts.scheme]
    conn = _PinnedConnection(host, port, sock, max(0.01, deadline - time.monotonic()))
    name = f"[{host}]" if ":" in host else host
    host_header = name if port == default else f"{name}:{port}"
    target = parts.path or "/"
    if parts.query:
      target += "?" + parts.query
    conn.request("GET", target, headers={"Host": host_header, "User-Agent": "jaxclf-serve",
                                         "Accept": "image/*", "Connection": "close"})
    resp = conn.getresponse()
    if 300 <= resp.status < 400:
      raise ApiError(422, "url_fetch_failed", f"{url!r}: HTTP {resp.status} redirect to "
                     f"{resp.getheader('Location')!r} not followed", field)
    if resp.status != 200:
      raise ApiError(422, "url_fetch_failed", f"{url!r}: HTTP {resp.status}", field)
    declared = resp.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
      raise ApiError(413, "file_too_large", f"{url!r}: {declared} bytes exceeds the URL limit of "
                     f"{limit}", field)
    chunks, size = [], 0
    while not resp.isclosed():  # http.client closes it at the end of the declared length
      sock.settimeout(max(0.01, deadline - time.monotonic()))
      chunk = resp.read(min(READ_CHUNK, limit + 1 - size))
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
      if size > limit:
        raise ApiError(413, "file_too_large", f"{url!r}: more than {limit} bytes", field)
      if time.monotonic() >= deadline:
        raise TimeoutError("deadline")
    return b"".join(chunks)


def _shutdown(sock: socket.socket) -> None:
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass
