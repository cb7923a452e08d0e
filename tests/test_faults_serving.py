"""Faults the gateway survives under load: Triton killed and restarted behind it, and the gateway
itself stopped with SIGTERM while requests run.

Real components on 127.0.0.1: `jaxclf serve` (uvicorn) in a subprocess, the real tritonserver from
the serving venv, 16 client threads (requests.Session each, as a client library would) posting
real PNGs. Each client honours Retry-After and stops after a bounded number of requests or when
the test says so; every outcome is classified and counted:

  ok        200 whose probabilities match the in-process reference (onnxruntime here)
  busy      503 with Retry-After (Triton down: `backend_unavailable`; SIGTERM: `draining`)
  refused   connection refused once the gateway's listener is closed (nothing was sent; safe
            to retry anywhere)
  other     anything else: a 5xx other than 503, a 503 without Retry-After, a wrong answer, a
            reset connection, a client timeout (a hang past the gateway's request timeout).
            Must be 0.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests

from test_serving import REPO, Server, fashion_arrays, png, session_export

CLIENTS = 16
REQUEST_TIMEOUT_S = 5.0  # the gateway's --request-timeout-s
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 25.0  # a response later than this is a hang
# Documented bound (docs/runbook.md, "Serving faults"): requests succeed again within this many
# seconds of Triton answering ready. The gateway's gRPC channels retry their connection at least
# once a second (serving/backends.py GRPC_RECONNECT_ARGS); the rest is margin for a loaded host.
TRITON_RECOVERY_BOUND_S = 15.0
WAIT_S = 60.0  # generous bound on each awaited event
SERVE_VENV_PY = REPO / ".venv-serve" / "bin" / "python"
# The API rounds confidences to 6 decimals (5e-7); onnxruntime inside Triton and here sum in a
# different order, a few float32 ulps of a probability <= 1 (~1e-7 each): 1e-5 covers both.
PROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  return session_export(tmp_path_factory)


@pytest.fixture(scope="module")
def cases(export_dir):
  """(png bytes, reference probabilities) for 8 test images, from onnxruntime in this process."""
  from jaxclf.data.transforms import preprocess
  from jaxclf.evaluate.model_loader import load_model
  from serving.backends import softmax
  model = load_model(str(export_dir))
  x, _ = fashion_arrays()["test"]
  return [(png(img), softmax(model.logits(preprocess(img, model.spec)[None]))[0]) for img in x[:8]]


@dataclasses.dataclass
class Outcome:
  t: float
  kind: str  # ok | busy (503) | refused (connection refused) | other
  detail: str = ""


class Load:
  """CLIENTS threads posting /v1/predict until stopped, each at most `max_requests` times."""

  def __init__(self, url: str, cases, max_requests: int = 400, stop_on_refused: bool = False):
    self.url, self.cases, self.max_requests = url, cases, max_requests
    self.stop_on_refused = stop_on_refused
    self.stop = threading.Event()
    self.outcomes: list[Outcome] = []
    self._lock = threading.Lock()
    self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                    for i in range(CLIENTS)]

  def __enter__(self) -> "Load":
    for t in self.threads:
      t.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop.set()
    for t in self.threads:
      t.join(CLIENT_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in self.threads), "a client did not stop"

  def count(self, kind: str, since: float = 0.0) -> int:
    with self._lock:
      return sum(1 for o in self.outcomes if o.kind == kind and o.t >= since)

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(collections.Counter(o.kind for o in self.outcomes))

  def first(self, kind: str, since: float) -> float | None:
    with self._lock:
      return min((o.t for o in self.outcomes if o.kind == kind and o.t >= since), default=None)

  def others(self) -> list[str]:
    with self._lock:
      return [o.detail for o in self.outcomes if o.kind == "other"][:10]

  def _record(self, kind: str, detail: str = "") -> None:
    with self._lock:
      self.outcomes.append(Outcome(time.monotonic(), kind, detail))

  def _client(self, i: int) -> None:
    session = requests.Session()
    for n in range(self.max_requests):
      if self.stop.is_set():
        break
      data, want = self.cases[(i + n) % len(self.cases)]
      kind, detail, wait = self._one(session, data, want)
      self._record(kind, detail)
      if kind == "refused" and self.stop_on_refused:
        break
      if wait:
        self.stop.wait(wait)  # a client that honours Retry-After
    session.close()

  def _one(self, session, data: bytes, want: np.ndarray) -> tuple[str, str, float]:
    try:
      r = session.post(self.url + "/v1/predict?top_k=10", files={"file": ("a.png", data)},
                       timeout=CLIENT_TIMEOUT_S)
    except requests.ConnectionError as e:
      if _refused(e):
        return "refused", "", 0.2
      return "other", f"connection error: {e!r}"[:300], 0.0
    except requests.Timeout as e:
      return "other", f"client timeout (a hang): {e!r}"[:300], 0.0
    if r.status_code == 503:
      retry_after = r.headers.get("Retry-After", "")
      if not retry_after.isdigit() or int(retry_after) < 1:
        return "other", f"503 without Retry-After: {r.text[:200]}", 0.0
      return "busy", r.json()["error"]["code"], float(retry_after)
    if r.status_code != 200:
      return "other", f"{r.status_code}: {r.text[:200]}", 0.0
    got = np.zeros(len(want))
    for p in r.json()["predictions"]:
      got[p["index"]] = p["confidence"]
    if not np.allclose(got, want, rtol=0, atol=PROB_ATOL):
      return "other", f"wrong answer: {got.round(6).tolist()} vs {want.round(6).tolist()}", 0.0
    return "ok", "", 0.0


def _refused(e: BaseException) -> bool:
  """Connection refused at connect time (nothing sent), anywhere in the exception chain."""
  seen = set()
  stack = [e]
  while stack:
    x = stack.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, ConnectionRefusedError) or getattr(x, "errno", None) == errno.ECONNREFUSED:
      return True
    # requests wraps urllib3's MaxRetryError (its .reason) around the socket error.
    linked = [x.__cause__, x.__context__, getattr(x, "reason", None), *getattr(x, "args", ())]
    stack += [y for y in linked if isinstance(y, BaseException)]
  return False


def wait_for(what: str, predicate, timeout: float = WAIT_S, poll: float = 0.1):
  deadline = time.monotonic() + timeout
  while True:
    value = predicate()
    if value:
      return value
    assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
    time.sleep(poll)


def ready_status(url: str) -> int | None:
  try:
    return requests.get(url + "/readyz", timeout=5).status_code
  except requests.RequestException:
    return None


# --------------------------------------------------------------------------- Triton dies

def test_triton_killed_under_load_gives_503_then_recovers_without_a_gateway_restart(
    export_dir, cases, tmp_path):
  if not SERVE_VENV_PY.exists():
    pytest.fail("the Triton backend runs in the serving venv: run scripts/setup_serving_env.sh")
  from jaxclf.export.triton_repository import write_model_repository
  from jaxclf.export.triton_server import TritonServer
  repo = tmp_path / "model_repository"
  write_model_repository(str(export_dir), str(repo), "fashion", 1)
  triton = TritonServer(str(repo), log_path=str(tmp_path / "triton.log")).start()
  gw = None
  try:
    gw = Server(export_dir, tmp_path / "gateway.log", "--backend", "triton", "--triton-url",
                triton.grpc_url, "--model", "fashion_image", "--request-timeout-s",
                str(REQUEST_TIMEOUT_S), "--no-request-log", python=str(SERVE_VENV_PY))
    with Load(gw.url, cases) as load:
      wait_for("32 answers before the fault", lambda: load.count("ok") >= 32)
      os.killpg(triton.proc.pid, signal.SIGKILL)  # Triton and its python-backend stubs
      triton.stop()  # reaps it, closes its log
      killed = time.monotonic()
      wait_for("/readyz false while Triton is down", lambda: ready_status(gw.url) == 503)
      wait_for("16 requests refused with 503 while Triton is down",
               lambda: load.count("busy", since=killed) >= CLIENTS)
      down = load.counts()
      triton.start()  # the same ports and model repository
      back = time.monotonic()
      wait_for("/readyz true again", lambda: ready_status(gw.url) == 200)
      first_ok = wait_for("a request succeeds after Triton is back",
                          lambda: load.first("ok", since=back), timeout=TRITON_RECOVERY_BOUND_S)
      wait_for("32 answers after recovery", lambda: load.count("ok", since=back) >= 32)
    counts = load.counts()
    print(json.dumps({"fault": "triton killed", "counts": counts, "while_down": down,
                      "first_ok_after_ready_s": round(first_ok - back, 3)}))
    assert load.others() == [], load.others()
    assert counts.get("other", 0) == 0 and counts.get("refused", 0) == 0, counts
    assert {o.detail for o in load.outcomes if o.kind == "busy"} == {"backend_unavailable"}
    assert gw.proc.poll() is None  # the same gateway process throughout
  finally:
    if gw is not None:
      gw.stop()
    triton.stop()


# --------------------------------------------------------------------------- gateway SIGTERM

def test_gateway_sigterm_under_load_drains_with_no_reset(export_dir, cases, tmp_path):
  gw = Server(export_dir, tmp_path / "gateway.log", "--shutdown-delay-s", "2",
              "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--no-request-log")
  try:
    with Load(gw.url, cases, stop_on_refused=True) as load:
      wait_for("32 answers before SIGTERM", lambda: load.count("ok") >= 32)
      gw.proc.send_signal(signal.SIGTERM)
      term = time.monotonic()
      wait_for("the gateway exits", lambda: gw.proc.poll() is not None)
      # Every client ends on a refused connection: the listener is gone, nothing was reset.
      wait_for("every client sees the listener closed",
               lambda: all(not t.is_alive() for t in load.threads))
    counts = load.counts()
    print(json.dumps({"fault": "gateway SIGTERM", "counts": counts,
                      "ok_after_sigterm": load.count("ok", since=term),
                      "exit_code": gw.proc.returncode}))
    assert load.others() == [], load.others()
    assert counts.get("other", 0) == 0, counts
    assert load.count("busy", since=term) >= 1 and counts["refused"] == CLIENTS, counts
    assert {o.detail for o in load.outcomes if o.kind == "busy"} == {"draining"}
    assert gw.proc.returncode in (0, -signal.SIGTERM), gw.log_tail()
    logs = " ".join(str(r.get("message")) for r in gw.log_records())
    assert "drained in" in logs, gw.log_tail()
    # Linux: the listener stopped taking connections before it closed (serving/shutdown.py).
    assert "filter on 1 of 1 sockets" in logs, gw.log_tail()
  finally:
    gw.stop()
