"""Running the gateway: one uvicorn server, or `--workers N` of them on one port.

  run_server(settings)    this process serves (uvicorn + uvloop + httptools, draining on SIGTERM)
  run_workers(settings)   a supervisor: N worker processes, each with its own event loop and its
                          own copy of the model, each bound to the same port with SO_REUSEPORT so
                          the kernel spreads connections over them

Why workers: one event loop is one core of GIL-bound Python (HTTP, multipart, decode), so on a
machine with spare cores the loop, not the model, caps throughput. Each worker loads and verifies
the model itself (no fork after onnxruntime started threads), starts listening only once it has,
and gets its share of the cores for onnxruntime (ServeSettings.ort_threads). What is per worker: /metrics, /v1/monitoring (the drift
window) and the admission limits (--max-inflight / --max-queue apply to each worker), and a hot
reload could reach only one worker, so POST /v1/admin/reload answers 409 with --workers > 1
(restart to change the model). On SIGTERM the supervisor passes the signal on; every worker drains
as a single server does (serving/shutdown.py). If a worker dies, the supervisor stops the others
and exits non-zero, for the service manager to restart the whole set.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from serving.settings import ServeSettings

log = logging.getLogger("jaxclf.serving")


def run_server(settings: ServeSettings, log_level: str = "info", sockets=None) -> int:
  import uvicorn
  from serving.app import create_app
  from serving.shutdown import DrainingServer
  if settings.gil_switch_interval_ms > 0:
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
  app = create_app(settings)
  # The fast event loop and HTTP parser when installed (requirements/serving-api.txt pins both).
  loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
  http = "httptools" if importlib.util.find_spec("httptools") else "h11"
  config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, loop=loop,
                          http=http, access_log=False, log_config=None,
                          log_level=log_level.lower(), timeout_keep_alive=15,
                          limit_concurrency=2048, backlog=2048,
                          timeout_graceful_shutdown=settings.drain_timeout_s)
  DrainingServer(config, app.state.gateway).run(sockets=sockets)
  return 0


def reuse_port_socket(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  sock.bind((host, port))
  sock.set_inheritable(True)
  return sock


def run_workers(settings: ServeSettings, log_level: str = "info") -> int:
  """The supervisor: starts settings.workers processes and waits for them."""
  if not hasattr(socket, "SO_REUSEPORT"):
    raise SystemExit("jaxclf serve: --workers needs SO_REUSEPORT (Linux, BSD, macOS)")
  if settings.port == 0:
    raise SystemExit("jaxclf serve: --workers needs a fixed --port (each worker binds it)")
  payload = json.dumps({"settings": dataclasses.asdict(settings), "log_level": log_level})
  procs = []
  for index in range(settings.workers):
    # Settings (keys included) go over a pipe, not argv or the environment.
    # Own session: a terminal's Ctrl-C reaches the supervisor only, which passes it on once
    # (a second signal would make a worker skip draining).
    p = subprocess.Popen([sys.executable, "-c", "from serving.server import worker_main; "
                          "worker_main()", str(index)], stdin=subprocess.PIPE,
                         start_new_session=True)
    p.stdin.write(payload.encode())
    p.stdin.close()
    procs.append(p)
  stopping = False

  def forward(sig, frame):
    nonlocal stopping
    stopping = True
    for p in procs:
      if p.poll() is None:
        p.send_signal(sig)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  log.info("supervisor: %d workers on %s:%d (pids %s)", len(procs), settings.host, settings.port,
           [p.pid for p in procs])
  lost_worker = False
  while any(p.poll() is None for p in procs):
    if not stopping and any(p.poll() is not None for p in procs):
      dead = [(p.pid, p.returncode) for p in procs if p.poll() is not None]
      log.error("supervisor: worker exited %s; stopping the others", dead)
      lost_worker = True
      forward(signal.SIGTERM, None)
    time.sleep(0.1)
  codes = [p.returncode for p in procs]
  # uvicorn re-raises the signal after its graceful shutdown: a worker stopped by it drained.
  clean = (0, -signal.SIGTERM, -signal.SIGINT)
  return 0 if stopping and not lost_worker and all(c in clean for c in codes) else 1


def worker_main() -> None:
  index = int(sys.argv[1])
  payload = json.loads(sys.stdin.read())
  fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["settings"].items()
            if k in fields}
  settings = ServeSettings(**values)
  from serving.middleware import configure_json_logging
  configure_json_logging(payload["log_level"].upper())
  log.info("worker %d/%d (pid %d) starting", index, settings.workers, os.getpid())
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                   name="parent-watch").start()
  sock = reuse_port_socket(settings.host, settings.port)
  sys.exit(run_server(settings, payload["log_level"], sockets=[sock]))


def _exit_with_parent(parent: int) -> None:
  """A worker whose supervisor died (even by SIGKILL) drains and exits instead of lingering."""
  while os.getppid() == parent:
    time.sleep(1.0)
  os.kill(os.getpid(), signal.SIGTERM)
