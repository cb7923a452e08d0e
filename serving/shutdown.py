"""Graceful shutdown: SIGTERM drains before uvicorn closes the sockets.

On the first SIGTERM (or SIGINT) the gateway starts draining: /readyz answers 503 so a load
balancer stops sending, and new predict requests get 503 `draining` with Retry-After and
`Connection: close`, while requests already in flight finish on the model. Once nothing is in
flight and at least shutdown_delay_s has passed (or drain_timeout_s, whichever first), uvicorn's
own shutdown runs: stop listening, finish open responses, lifespan shutdown. A second signal
exits at once.
"""
from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger("jaxclf.serving")
POLL_S = 0.02


class DrainingServer(uvicorn.Server):

  def __init__(self, config: uvicorn.Config, gateway):
    super().__init__(config)
    self.gateway = gateway
    self._drain_started: float | None = None

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
