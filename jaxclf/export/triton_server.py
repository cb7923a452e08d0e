"""The Triton server that serves a model repository here, and the repository API of a running one.

`TritonServer` runs `tritonserver` from the serving venv (jaxclf.export.serving_env) on free local
ports (from JAXCLF_PORT_RANGE=LO-HI when set) with its own python-backend shared-memory prefix, in
explicit model-control mode loading the servable models (`servable_models`: those whose backend this
build has). `reload_models`, `wait_unloaded` and `repository_index` talk to a running
server's HTTP repository API (jaxclf.export.triton_repository.live_update switches versions with
them).

This module imports neither jax nor onnx: it runs in both the training and the serving venv.
"""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from jaxclf.export.serving_env import ServingEnv
from jaxclf.export.triton_config import validate_repository


class TritonServerError(RuntimeError):
  """The server did not start, died, or refused a repository request."""


def servable_models(repo_dir: str, backend_dir: str) -> list[str]:
  """Models this server can load: those whose backend is present (NAME_onnx needs the onnxruntime
  backend, absent from the pytriton build), plus ensembles whose steps are all servable."""
  configs = validate_repository(repo_dir)
  have = set(os.listdir(backend_dir)) if os.path.isdir(backend_dir) else set()
  platform_backend = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt",
                      "pytorch_libtorch": "pytorch", "tensorflow_savedmodel": "tensorflow"}
  ok = {n for n, c in configs.items()
        if c.platform != "ensemble" and (c.backend or platform_backend.get(c.platform, "")) in have}
  for n, c in configs.items():
    if c.platform == "ensemble" and all(s.model_name in ok for s in c.ensemble_scheduling.step):
      ok.add(n)
  return sorted(ok)


PORT_RANGE_ENV = "JAXCLF_PORT_RANGE"
_range_cursor: dict[tuple[int, int], int] = {}
_range_lock = threading.Lock()


def port_range(environ=os.environ) -> tuple[int, int] | None:
  """JAXCLF_PORT_RANGE=LO-HI -> (LO, HI); unset or empty -> None (the kernel picks any free port)."""
  spec = environ.get(PORT_RANGE_ENV, "").strip()
  if not spec:
    return None
  lo_s, sep, hi_s = spec.partition("-")
  if not (sep and lo_s.strip().isdigit() and hi_s.strip().isdigit()
          and 1024 <= int(lo_s) <= int(hi_s) <= 65535):
    raise TritonServerError(f"{PORT_RANGE_ENV}={spec!r}: expected LO-HI with 1024 <= LO <= HI "
                            "<= 65535, e.g. 20000-20999")
  return int(lo_s), int(hi_s)


def _bindable(port: int) -> bool:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def free_port() -> int:
  """A local port no one listens on. Choosing a port and the server binding it are two steps, so two
  processes that both ask the kernel for any free port can be handed the same one in between. With
  JAXCLF_PORT_RANGE set, ports come from that range instead, each handed out once per process before
  the range wraps: processes given disjoint ranges (parallel test workers) never choose alike."""
  rng = port_range()
  if rng is None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]
  lo, hi = rng
  size = hi - lo + 1
  with _range_lock:
    # a random first port: unrelated processes handed the same range do not start in step
    start = _range_cursor.get(rng, random.randrange(size))
    for i in range(size):
      port = lo + (start + i) % size
      if _bindable(port):
        _range_cursor[rng] = (start + i + 1) % size
        return port
  raise TritonServerError(f"no free port in {PORT_RANGE_ENV}={lo}-{hi}")


def shm_prefix(tag: str) -> str:
  return f"jaxclf_{tag}_"


def shm_prefix_args(extra: Sequence[str], tag: str) -> list[str]:
  """The python backend's shared-memory region prefix, unique to this server (`tag`): two servers
  on one machine must not share one. Nothing when `extra` already sets it."""
  if any("shm-region-prefix-name" in a for a in extra):
    return []
  return [f"--backend-config=python,shm-region-prefix-name={shm_prefix(tag)}"]


def server_command(env: ServingEnv, repo_dir: str, *, http_port: int, grpc_port: int,
                   metrics_port: int, models: Sequence[str] | None = None,
                   poll_secs: int | None = None, address: str = "127.0.0.1",
                   extra: Sequence[str] = ()) -> list[str]:
  cmd = [env.tritonserver, f"--model-repository={os.path.abspath(repo_dir)}",
         f"--backend-directory={env.backend_dir}", f"--http-port={http_port}",
         f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false",
         f"--http-address={address}", f"--grpc-address={address}"]
  if poll_secs:
    # Poll mode loads every model in the repository: one it cannot load (NAME_onnx here) must not
    # stop the server or make it unready.
    cmd += ["--model-control-mode=poll", f"--repository-poll-secs={poll_secs}",
            "--exit-on-error=false", "--strict-readiness=false"]
  else:
    cmd += ["--model-control-mode=explicit"]
    cmd += [f"--load-model={m}" for m in (models if models is not None
                                          else servable_models(repo_dir, env.backend_dir))]
  return [*cmd, *extra]


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
  req = urllib.request.Request(url, data=body, method=method)
  if body is not None:
    req.add_header("Content-Type", "application/json")
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _base(url: str) -> str:
  return url if url.startswith("http") else f"http://{url}"


def reload_models(url: str, names: Sequence[str], timeout: float = 120) -> None:
  """Loads (or reloads, re-reading config.pbtxt) models through the repository API, in order.
  Blocks until each is loaded; raises TritonServerError with the server's message otherwise."""
  for name in names:
    status, body = _http("POST", f"{_base(url)}/v2/repository/models/{name}/load", b"{}", timeout)
    if status != 200:
      raise TritonServerError(f"loading {name} on {url} failed ({status}): "
                              f"{body.decode(errors='replace')}")


def wait_unloaded(url: str, model: str, version: int, timeout: float = 120) -> None:
  """Blocks until `model` `version` is no longer READY (Triton unloads a version only after its
  in-flight requests have completed)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not any(e.get("name") == model and str(e.get("version")) == str(version)
               and e.get("state") == "READY" for e in repository_index(url)):
      return
    time.sleep(0.05)
  raise TritonServerError(f"{model} version {version} still loaded after {timeout:.0f}s")


def repository_index(url: str) -> list[dict[str, Any]]:
  status, body = _http("POST", f"{_base(url)}/v2/repository/index", b"{}")
  if status != 200:
    raise TritonServerError(f"repository index on {url} failed ({status}): {body!r}")
  return json.loads(body)


class TritonServer:
  """A real tritonserver process on free local ports. Use as a context manager."""

  def __init__(self, repo_dir: str, *, env: ServingEnv | None = None,
               models: Sequence[str] | None = None, http_port: int = 0, grpc_port: int = 0,
               metrics_port: int = 0, poll_secs: int | None = None, log_path: str | None = None,
               extra_args: Sequence[str] = ()):
    self.repo_dir = os.path.abspath(repo_dir)
    self.env = env or ServingEnv.find()
    self.models = list(models) if models is not None else servable_models(repo_dir,
                                                                           self.env.backend_dir)
    self.http_port = http_port or free_port()
    self.grpc_port = grpc_port or free_port()
    self.metrics_port = metrics_port or free_port()
    self.poll_secs = poll_secs
    # Not inside the repository: Triton would not mind, but it is the users' tree.
    self.log_path = log_path or os.path.join(tempfile.gettempdir(),
                                             f"jaxclf-tritonserver-{self.http_port}.log")
    self.extra_args = list(extra_args)
    self.shm_tag = f"{os.getpid()}_{self.http_port}"
    self.proc: subprocess.Popen | None = None

  @property
  def http_url(self) -> str:
    return f"127.0.0.1:{self.http_port}"

  @property
  def grpc_url(self) -> str:
    return f"127.0.0.1:{self.grpc_port}"

  @property
  def metrics_url(self) -> str:
    return f"http://127.0.0.1:{self.metrics_port}/metrics"

  def command(self) -> list[str]:
    return server_command(self.env, self.repo_dir, http_port=self.http_port,
                          grpc_port=self.grpc_port, metrics_port=self.metrics_port,
                          models=self.models, poll_secs=self.poll_secs,
                          extra=[*shm_prefix_args(self.extra_args, self.shm_tag),
                                 *self.extra_args])

  def start(self, timeout: float = 90) -> "TritonServer":
    self._log = open(self.log_path, "wb")
    self.proc = subprocess.Popen(self.command(), env=self.env.environ(), stdout=self._log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise TritonServerError(f"tritonserver exited with {self.proc.returncode} while starting:\n"
                                f"{self.log_tail()}")
      if self.ready():
        return self
      time.sleep(0.1)
    self.stop()
    raise TritonServerError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

  def ready(self) -> bool:
    try:
      status, _ = _http("GET", f"http://{self.http_url}/v2/health/ready", timeout=2)
    except OSError:
      return False
    if status != 200:
      return False
    return all(self.model_ready(m) for m in self.models) if not self.poll_secs else True

  def model_ready(self, model: str) -> bool:
    try:
      return _http("GET", f"http://{self.http_url}/v2/models/{model}/ready", timeout=2)[0] == 200
    except OSError:
      return False

  def log_tail(self, chars: int = 4000) -> str:
    try:
      with open(self.log_path, "rb") as f:
        return f.read().decode(errors="replace")[-chars:]
    except OSError:
      return "(no log)"

  def stop(self, timeout: float = 20) -> int | None:
    if self.proc is None:
      return None
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its stubs
        self.proc.wait(5)
    self._log.close()
    self._remove_leftover_shm()
    return self.proc.returncode

  def _remove_leftover_shm(self) -> None:
    """Shared-memory regions that stubs killed with the server left behind (a clean shutdown
    removes its own); only this server's prefix, and only once the server is gone."""
    if any("shm-region-prefix-name" in a for a in self.extra_args):
      return
    for path in glob.glob(os.path.join("/dev/shm", shm_prefix(self.shm_tag) + "*")):
      try:
        os.unlink(path)
      except OSError:
        pass

  def __enter__(self) -> "TritonServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
