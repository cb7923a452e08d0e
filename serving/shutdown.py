"""Graceful shutdown: SIGTERM drains before uvicorn closes the sockets.

On the first SIGTERM (or SIGINT) the gateway starts draining: /readyz answers 503 so a load
balancer stops sending, and new predict requests get 503 `draining` with Retry-After and
`Connection: close`, while requests already in flight finish on the model. Once nothing is in
flight and at least shutdown_delay_s has passed (or drain_timeout_s, whichever first), the
listeners stop taking connections without resetting any:

  1. a drop-all socket filter goes on each listening socket (Linux): new SYNs are dropped, so a
     client's connect() retries and is refused once the socket closes; nothing was sent.
  2. for LISTENER_GRACE_S the event loop still accepts what was already queued, and those
     requests get their 503.
  3. the listening sockets close, then uvicorn's own shutdown runs: close idle connections,
     finish open responses, lifespan shutdown.

Closing a listening socket resets the connections in its accept queue, so a client that
connected a moment before would see its request reset; the filter and the grace empty the queue
first. A second signal exits at once.

What a client sees, in order: 200 for requests already in flight; 503 `draining` (Retry-After,
Connection: close) for requests that arrive while draining; then connection refused. Never a reset
of a connection that carries a request, unless the client sends on an idle keep-alive connection
at the very moment it is closed (HTTP's own race; a 503 with Connection: close ends every
connection that sends during the drain, so a client that keeps sending does not hold one).
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
import threading
import time

import uvicorn

log = logging.getLogger("jaxclf.serving")
POLL_S = 0.02
LISTENER_GRACE_S = 0.5
SO_ATTACH_FILTER = 26  # Linux's value (the socket module does not export it)
# One classic-BPF instruction, `ret #0` (BPF_RET | BPF_K, k = 0): keep 0 bytes, i.e. drop.
_DROP_ALL = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))


def refuse_new_connections(sock) -> bool:
  """Attach the drop-all filter (struct sock_fprog {len, *filter}); False where unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  prog = struct.pack("HL", 1, ctypes.addressof(_DROP_ALL))
  try:
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
  except OSError:
    return False
  return True


class DrainingServer(uvicorn.Server):

  def __init__(self, config: uvicorn.Config, gateway):
    super().__init__(config)
    self.gateway = gateway
    self._drain_started: float | None = None

  async def shutdown(self, sockets=None) -> None:
    servers = list(getattr(self, "servers", ()))
    filtered = [refuse_new_connections(sock) for server in servers for sock in server.sockets]
    log.info("listeners refuse new connections (filter on %d of %d sockets)", sum(filtered),
             len(filtered))
    await asyncio.sleep(LISTENER_GRACE_S)  # the loop accepts and answers what was queued
    for server in servers:
      server.close()
    for sock in sockets or []:
      sock.close()
    await super().shutdown(sockets)

  def handle_exit(self, sig, frame) -> None:
    if self._drain_started is not None:  # a second signal: no more waiting
      return super().handle_exit(sig, frame)
    self._drain_started = time.monotonic()
    self.gateway.draining = True
    log.info("draining: %d requests in flight", self.gateway.inflight)
    threading.Thread(target=self._wait_then_exit, args=(sig, frame), daemon=True,
                     name="drain").start()

  def _wait_then_exit(self, sig, frame) -> None:
    s = self.gateway.settings
    start = self._drain_started
    while True:
      waited = time.monotonic() - start
      # gateway.inflight counts requests inside the middleware, the draining 503s included.
      busy = self.gateway.inflight > 0
      if waited >= s.drain_timeout_s or (waited >= s.shutdown_delay_s and not busy):
        break
      time.sleep(POLL_S)
    log.info("drained in %.3f s (%d still in flight); shutting down",
             time.monotonic() - start, self.gateway.inflight)
    super().handle_exit(sig, frame)
