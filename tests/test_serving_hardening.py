"""The gateway facing the internet: auth before the body, several keys with token buckets,
--protect-ops, load shedding (429), draining on SIGTERM (503, in-flight finished), SSRF refusals
through the API, all-items-failed batches (422), integrity on every load path (tamper tests), and
a hot reload between two exports whose predictions differ.

Real servers (`python -m serving.predict_cli serve`) on 127.0.0.1, real exports, real files.
"""
from __future__ import annotations

import ast
import base64
import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from test_serving import (ADMIN_TOKEN, REPO, Server, fashion_arrays, free_port, png,
                          session_export)

FILE_KEY, SLOW_KEY, ENV_KEY = "file-key-1", "slow-key-2", "env-key-3"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  return session_export(tmp_path_factory)


@pytest.fixture(scope="module")
def images():
  x, _ = fashion_arrays()["test"]
  return [png(im) for im in x[:64]]


@pytest.fixture(scope="module")
def guarded(export_dir, tmp_path_factory):
  """Keys from a file (one rate-limited) and from the environment, --protect-ops, an admin
  token, URL fetch to img.example.com pinned to loopback, and a small admission limit."""
  tmp = tmp_path_factory.mktemp("guarded")
  keys = tmp / "keys.txt"
  # slow: 2 requests at once, then one per 5 s (slow enough for a loaded machine)
  keys.write_text(f"# name key rate burst\nclient-a {FILE_KEY}\nslow {SLOW_KEY} 0.2 2\n")
  s = Server(export_dir, tmp / "server.log", "--api-keys-file", str(keys), "--protect-ops",
             "--allow-url-fetch", "--url-allowlist", "img.example.com",
             "--url-resolve", "img.example.com=127.0.0.1", "--max-inflight", "2",
             "--max-queue", "2", env={"JAXCLF_SERVE_API_KEYS": ENV_KEY,
                                      "JAXCLF_SERVE_ADMIN_TOKEN": ADMIN_TOKEN})
  yield s
  s.stop()


def _key(k=FILE_KEY):
  return {"X-API-Key": k}


def _read_response(sock) -> tuple[bytes, bytes]:
  """One HTTP/1.1 response with a Content-Length: (status line + headers, body)."""
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = sock.recv(65536)
    if not chunk:
      raise AssertionError(f"connection closed mid-headers: {data!r}")
    data += chunk
  head, body = data.split(b"\r\n\r\n", 1)
  length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:"))
  while len(body) < length:
    chunk = sock.recv(65536)
    if not chunk:
      break
    body += chunk
  return head, body


# --------------------------------------------------------------------------- layering

def test_export_and_the_training_core_never_import_serving():
  offenders = []
  for path in (REPO / "jaxclf").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                    if n == "serving" or n.startswith("serving.")]
  assert offenders == []


# --------------------------------------------------------------------------- auth

def test_keys_protect_predict_and_ops_and_probes_stay_open(guarded, images):
  files = {"file": ("a.png", images[0], "image/png")}
  assert requests.post(guarded.url + "/v1/predict", files=files).status_code == 401
  for key in (FILE_KEY, ENV_KEY):
    r = requests.post(guarded.url + "/v1/predict", files=files, headers=_key(key))
    assert r.status_code == 200, r.text
  for path in ("/metrics", "/v1/models", "/v1/monitoring", "/docs"):
    r = requests.get(guarded.url + path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
    assert requests.get(guarded.url + path, headers=_key()).status_code == 200, path
  for path in ("/healthz", "/readyz", "/openapi.json"):
    assert requests.get(guarded.url + path).status_code == 200, path
  time.sleep(0.2)
  names = {r.get("api_key") for r in guarded.log_records() if r.get("status") == 200}
  assert {"client-a", "env-0"} <= names  # the access log says which key was used


def test_405_names_the_allowed_methods_on_every_route(guarded):
  """RFC 9110 §15.5.6: a 405 carries Allow. Every documented path, with credentials that get
  past auth, answers undeclared methods (TRACE among them) with 405 + Allow listing its own."""
  spec = requests.get(guarded.url + "/openapi.json").json()
  creds = {**_key(), "Authorization": f"Bearer {ADMIN_TOKEN}"}
  checked = 0
  for path, ops in spec["paths"].items():
    declared = {m.upper() for m in ops}
    for method in sorted({"TRACE", "PUT", "DELETE", "PATCH", "GET", "POST"} - declared):
      r = requests.request(method, guarded.url + path, headers=creds, timeout=10)
      assert r.status_code == 405, (method, path, r.status_code, r.text[:200])
      allow = {m.strip() for m in r.headers.get("Allow", "").split(",") if m.strip()}
      assert declared <= allow and method not in allow, (method, path, r.headers)
      assert r.json()["error"]["code"] == "method_not_allowed"
      checked += 1
  assert checked >= 9 * 4


def test_401_carries_a_challenge_and_403_is_for_a_known_caller(guarded, images):
  files = {"file": ("a.png", images[0], "image/png")}
  admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
  reload = guarded.url + "/v1/admin/reload"
  body = {"model_path": "/nonexistent"}
  cases = {  # what the request carries -> (status, code, challenge prefix or None)
      "predict, no key": (requests.post(guarded.url + "/v1/predict", files=files),
                          401, "unauthorized", "ApiKey"),
      "predict, wrong key": (requests.post(guarded.url + "/v1/predict", files=files,
                                           headers=_key("nope")), 401, "unauthorized", "ApiKey"),
      "ops, no key": (requests.get(guarded.url + "/v1/models"), 401, "unauthorized", "ApiKey"),
      "admin, nothing": (requests.post(reload, json=body), 401, "unauthorized", "Bearer"),
      # An API key is not an admin credential: the admin one is missing, so 401 still.
      "admin, API key only": (requests.post(reload, json=body, headers=_key()), 401,
                              "unauthorized", "Bearer"),
      "admin, wrong token": (requests.post(reload, json=body,
                                           headers={"Authorization": "Bearer nope"}),
                             401, "unauthorized", 'Bearer realm="jaxclf-admin", error='),
      # The admin identified, but admins do not spend a client's quota on predict routes.
      "predict, admin token": (requests.post(guarded.url + "/v1/predict", files=files,
                                             headers=admin), 403, "forbidden", None),
  }
  for what, (r, status, code, challenge) in cases.items():
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), (what, r.text[:300])
    if challenge is not None:
      assert r.headers.get("WWW-Authenticate", "").startswith(challenge), (what, r.headers)
  # The admin token itself does reach the admin route (422: that path holds no model).
  r = requests.post(reload, json=body, headers=admin)
  assert r.status_code == 422 and r.json()["error"]["code"] == "model_load_failed", r.text


def test_an_admin_token_sent_to_a_server_without_admin_is_403():
  from serving.auth import Guard
  from serving.errors import ApiError
  from serving.settings import ServeSettings
  guard = Guard(ServeSettings())
  with pytest.raises(ApiError) as e:
    guard.check("/v1/admin/reload", {b"authorization": b"Bearer something"})
  assert (e.value.status, e.value.code) == (403, "admin_disabled")
  with pytest.raises(ApiError) as e:
    guard.check("/v1/admin/reload", {})
  assert (e.value.status, e.value.code) == (401, "unauthorized")
  assert e.value.headers()["WWW-Authenticate"].startswith("Bearer ")


def test_the_key_is_checked_before_the_body_is_read(guarded):
  """Headers announce a 1 MB JSON body that never comes: the 401 arrives at once (a server
  that read the body first would wait for it and answer 408 after request_timeout_s)."""
  for path, extra in (("/v1/predict/json", b"Content-Type: application/json\r\n"),
                      ("/v1/admin/reload", b"Content-Type: application/json\r\n"
                                           b"Authorization: Bearer wrong\r\n")):
    # The event is the status, not a time: a server that read the body first would answer 408
    # after its request_timeout_s (10 s), which the 60 s socket timeout lets arrive and fail.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=60) as sock:
      sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra
                   + b"Content-Length: 1000000\r\n\r\n{\"images\": [")
      head, body = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 401") and b"unauthorized" in body, (path, head, body)


def test_a_key_over_its_token_bucket_gets_429_with_retry_after(guarded, images):
  files = {"file": ("a.png", images[1], "image/png")}
  with requests.Session() as s:
    replies = [s.post(guarded.url + "/v1/predict", files=files, headers=_key(SLOW_KEY))
               for _ in range(6)]
  codes = [r.status_code for r in replies]
  assert codes[:2] == [200, 200] and codes.count(429) >= 3, codes
  limited = next(r for r in replies if r.status_code == 429)
  assert limited.json()["error"]["code"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
  # Another key is not affected by this one's bucket.
  assert requests.post(guarded.url + "/v1/predict", files=files,
                       headers=_key()).status_code == 200


def test_a_burst_above_the_limit_is_shed_with_429_and_no_5xx(guarded, images):
  """max_inflight 2 + max_queue 2; 24 clients at once with 64-image batches."""
  files = [("files", (f"{i}.png", im, "image/png")) for i, im in enumerate(images)]
  barrier = threading.Barrier(24)

  def one(_):
    barrier.wait()
    r = requests.post(guarded.url + "/v1/predict/batch", files=files, headers=_key(), timeout=60)
    return r.status_code, r.headers.get("Retry-After"), r.json()["error"]["code"] if \
        r.status_code != 200 else None

  with cf.ThreadPoolExecutor(24) as pool:
    results = list(pool.map(one, range(24)))
  codes = [c for c, _, _ in results]
  print(json.dumps({"burst": 24, "200": codes.count(200), "429": codes.count(429)}))
  assert all(c in (200, 429) for c in codes), codes
  assert codes.count(200) >= 4 and codes.count(429) >= 1, codes
  assert all(ra and code == "overloaded" for c, ra, code in results if c == 429)


# --------------------------------------------------------------------------- SSRF + 422 batches

def test_url_to_a_name_pinned_to_loopback_is_refused_and_all_failed_is_422(guarded, images):
  # Refused before any connection (tests/test_url_fetch.py fetches from a real local server).
  url = f"http://img.example.com:{free_port()}/shoe.png"
  r = requests.post(guarded.url + "/v1/predict/json", headers=_key(),
                    json={"images": [{"url": url},
                                     {"url": "http://169.254.169.254/latest/meta-data/"}]})
  assert r.status_code == 422, r.text
  body = r.json()
  assert body["error"]["code"] == "all_items_failed" and (body["succeeded"], body["failed"]) == (0, 2)
  assert body["results"][0]["error"]["code"] == "url_blocked"
  assert "127.0.0.1" in body["results"][0]["error"]["message"]
  assert body["results"][1]["error"]["code"] == "url_not_allowed"
  # One good item makes it a partial failure: 200 with the per-item error.
  r = requests.post(guarded.url + "/v1/predict/json", headers=_key(), json={"images": [
      {"b64": base64.b64encode(images[0]).decode()}, {"url": url}]})
  assert r.status_code == 200 and (r.json()["succeeded"], r.json()["failed"]) == (1, 1)
  # Multipart: every file bad -> 422 with per-item errors.
  r = requests.post(guarded.url + "/v1/predict/batch", headers=_key(), files=[
      ("files", ("a.txt", b"not an image", "application/octet-stream")),
      ("files", ("b.png", b"", "image/png"))])
  assert r.status_code == 422 and r.json()["error"]["code"] == "all_items_failed"
  assert [x["error"]["code"] for x in r.json()["results"]] == ["not_an_image", "empty_file"]


# --------------------------------------------------------------------------- draining

def test_sigterm_drains_finishing_in_flight_requests(export_dir, tmp_path, images):
  srv = Server(export_dir, tmp_path / "drain.log", "--shutdown-delay-s", "1.0")
  try:
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + images[2] + b"\r\n--b--\r\n")
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                 b"boundary=b\r\nContent-Length: " + str(len(part)).encode() + b"\r\n\r\n"
                 + part[:40])
    time.sleep(0.3)  # in flight: admitted, waiting for the rest of its body
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = requests.get(srv.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    refused = requests.post(srv.url + "/v1/predict", files={"file": ("a.png", images[3])},
                            timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert refused.headers["Retry-After"] and refused.headers.get("connection") == "close"
    sock.sendall(part[40:])  # the in-flight request finishes, on the model
    head, body = _read_response(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 200"), (head, body[:300])
    assert json.loads(body)["predictions"]
    srv.proc.wait(20)
    assert srv.proc.returncode in (0, -signal.SIGTERM)
    logs = " ".join(str(r.get("message")) for r in srv.log_records())
    assert "draining" in logs and "drained" in logs
  finally:
    srv.stop()


# --------------------------------------------------------------------------- integrity

def _copy_export(src, dst) -> Path:
  shutil.copytree(src, dst)
  return Path(dst)


def _flip_a_byte(path: Path) -> None:
  os.chmod(path, 0o644)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def _serve_refuses(model_path, *args, env=None) -> str:
  r = subprocess.run([sys.executable, "-m", "serving.predict_cli", "serve", "--model-path",
                      str(model_path), *args], cwd=REPO, capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=60)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  return r.stderr


def test_tampered_or_unrecorded_export_is_refused_by_the_gateway(export_dir, tmp_path):
  from serving.backends import ModelLoadError, load_bundle
  tampered = _copy_export(export_dir, tmp_path / "tampered")
  _flip_a_byte(tampered / "model.onnx")
  err = _serve_refuses(tampered)
  assert "model.onnx" in err and "does not match" in err and "export.json" in err
  unrecorded = _copy_export(export_dir, tmp_path / "unrecorded")
  meta = json.loads((unrecorded / "export.json").read_text())
  del meta["artifacts"]["model.onnx"]
  (unrecorded / "export.json").write_text(json.dumps(meta))
  with pytest.raises(ModelLoadError, match="no recorded sha256.*--allow-unverified"):
    load_bundle(str(unrecorded))
  assert load_bundle(str(unrecorded), allow_unverified=True).sha256 == hashlib.sha256(
      (unrecorded / "model.onnx").read_bytes()).hexdigest()


def test_the_bytes_that_were_hashed_are_the_bytes_that_run(export_dir, tmp_path, tmp_path_factory,
                                                          images):
  """Swap model.onnx on disk after the check: the backend still runs the verified bytes."""
  from jaxclf.data.decode import decode_image
  from jaxclf.data.transforms import preprocess
  from serving.backends import OnnxBackend, load_bundle
  other = session_export(tmp_path_factory, seed=1)
  copy = _copy_export(export_dir, tmp_path / "swap")
  bundle = load_bundle(str(copy))
  assert hashlib.sha256(bundle.model_bytes).hexdigest() == bundle.sha256
  shutil.copyfile(other / "model.onnx", copy / "model.onnx")  # after the check, before the load
  x = preprocess(decode_image(images[0], 1), bundle.spec)[None]
  got = OnnxBackend(bundle, micro_batching=False).run(x)
  want = OnnxBackend(load_bundle(str(export_dir)), micro_batching=False).run(x)
  swapped = OnnxBackend(load_bundle(str(other)), micro_batching=False).run(x)
  np.testing.assert_array_equal(got, want)
  assert np.abs(got - swapped).max() > 1e-3


def test_tampered_registry_version_is_refused_by_gateway_and_evaluate(export_dir, tmp_path):
  from jaxclf.evaluate.model_loader import EvaluationError, load_model
  from jaxclf.registry import Registry
  root = tmp_path / "registry"
  reg = Registry(str(root))
  reg.register(str(export_dir), "fashion", stage="production")
  version_dir = Path(reg.open_version("fashion", 1))
  _flip_a_byte(version_dir / "model.onnx")
  err = _serve_refuses("registry:fashion@production", env={"JAXCLF_REGISTRY": str(root)})
  assert "model.onnx" in err and "refusing to load" in err
  with pytest.raises(EvaluationError, match="model.onnx.*refusing to load"):
    load_model(f"registry:fashion@production?root={root}")


def test_evaluate_checks_the_export_it_scores(export_dir, tmp_path):
  from jaxclf.evaluate.model_loader import EvaluationError, load_model
  tampered = _copy_export(export_dir, tmp_path / "tampered")
  _flip_a_byte(tampered / "model.onnx")
  with pytest.raises(EvaluationError, match=r"model.onnx: sha256 .* does not match"):
    load_model(str(tampered))
  (tampered / "export.json").unlink()
  with pytest.raises(EvaluationError, match="no recorded sha256"):
    load_model(str(tampered / "model.onnx"))
  good = load_model(str(export_dir))
  assert good.sha256 == hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()


def test_triton_classifier_refuses_a_tampered_copy_at_initialize(export_dir, tmp_path):
  from jaxclf.export.serving_env import ServingEnv, ServingEnvError
  from jaxclf.export.triton_repository import write_model_repository
  from jaxclf.export.triton_server import TritonServer, TritonServerError
  try:
    env = ServingEnv.find()
  except ServingEnvError as e:
    pytest.fail(f"{e}: run scripts/setup_serving_env.sh", pytrace=False)
  repo = tmp_path / "model_repository"
  write_model_repository(str(export_dir), str(repo), "fashion", 1)
  # Triton's classifier loads the raw-pixel graph (model_raw.onnx), hashed by the export.
  recorded = json.loads((repo / "fashion" / "1" / "integrity.json").read_text())
  assert recorded["model_raw.onnx"] == hashlib.sha256(
      (export_dir / "model_raw.onnx").read_bytes()).hexdigest()
  _flip_a_byte(repo / "fashion" / "1" / "model_raw.onnx")
  server = TritonServer(str(repo), env=env, models=["fashion"], log_path=str(tmp_path / "t.log"))
  with pytest.raises(TritonServerError) as e:
    server.start(timeout=60)
  server.stop()
  assert "model_raw.onnx" in str(e.value) and "does not match" in str(e.value)


# --------------------------------------------------------------------------- hot reload

def test_hot_reload_between_different_weights_keeps_predictions_and_version_together(
    export_dir, tmp_path_factory, images):
  from jaxclf.data.decode import decode_image
  from jaxclf.data.transforms import preprocess
  from jaxclf.registry import Registry
  from serving.backends import OnnxBackend, load_bundle, softmax
  other = session_export(tmp_path_factory, seed=1)
  tmp = tmp_path_factory.mktemp("reload")
  root = str(tmp / "registry")
  reg = Registry(root)
  reg.register(str(export_dir), "fashion", stage="production")
  reg.register(str(other), "fashion", stage="staging")
  sample = images[:4]
  expected = {}
  for version, path in (("1", export_dir), ("2", other)):
    b = load_bundle(str(path))
    x = np.stack([preprocess(decode_image(d, 1), b.spec) for d in sample])
    expected[version] = softmax(OnnxBackend(b, micro_batching=False).run(x))
  assert np.abs(expected["1"] - expected["2"]).max() > 1e-2  # the weights really differ
  srv = Server("registry:fashion@production", tmp / "reload.log",
               env={"JAXCLF_SERVE_ADMIN_TOKEN": ADMIN_TOKEN, "JAXCLF_REGISTRY": root})
  stop = threading.Event()
  results: list[tuple[int, int, dict]] = []

  def hammer(worker):
    with requests.Session() as s:
      i = worker
      while not stop.is_set():
        j = i % len(sample)
        r = s.post(srv.url + "/v1/predict?top_k=10", files={"file": ("a.png", sample[j])})
        results.append((r.status_code, j, r.json()))
        i += 1

  try:
    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
      t.start()
    time.sleep(1.0)
    reg.promote("fashion", 2, "production", reason="test")
    r = requests.post(srv.url + "/v1/admin/reload", json={"model_path": "registry:fashion@production"},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    time.sleep(1.0)
    stop.set()
    for t in threads:
      t.join()
  finally:
    stop.set()
    srv.stop()
  assert r.status_code == 200 and r.json()["current"]["version"] == "2", r.text
  assert [c for c, _, _ in results if c != 200] == []
  seen = {"1": 0, "2": 0}
  for _, j, body in results:
    version = body["model"]["version"]
    got = np.zeros(10)
    for p in body["predictions"]:
      got[p["index"]] = p["confidence"]
    np.testing.assert_allclose(got, expected[version][j], atol=2e-6)
    seen[version] += 1
  print(json.dumps({"requests": len(results), "by_version": seen}))
  assert seen["1"] > 10 and seen["2"] > 10, seen


def test_admission_queue_hands_slots_over_in_order_and_leaks_none():
  import asyncio
  from serving.errors import RateLimited
  from serving.middleware import Admission

  async def scenario():
    a = Admission(limit=1, queue=2)
    await a.acquire(1.0)  # runs
    order = []

    async def waiter(name, timeout=1.0):
      await a.acquire(timeout)
      order.append(name)

    w1 = asyncio.ensure_future(waiter("first"))
    w2 = asyncio.ensure_future(waiter("second"))
    await asyncio.sleep(0)
    with pytest.raises(RateLimited) as e:  # 1 running + 2 queued: full
      await a.acquire(1.0)
    assert e.value.status == 429 and e.value.code == "overloaded"
    w2.cancel()  # a client that went away while queued
    await asyncio.sleep(0)
    a.release()
    await w1
    assert order == ["first"] and a.active == 1 and not a.waiters
    with pytest.raises(RateLimited):  # a queue wait has a deadline too
      await waiter("late", timeout=0.05)
    a.release()
    assert a.active == 0 and not a.waiters

  asyncio.run(scenario())


def test_keys_file_errors_name_the_file_and_line(tmp_path):
  from serving.auth import read_keys_file
  path = tmp_path / "keys.txt"
  path.write_text("# comment\nok key-1\nbad key-2 fast\n")
  with pytest.raises(ValueError, match=r"keys.txt:3: rate_per_s and burst must be numbers"):
    read_keys_file(str(path))
  path.write_text("lonely\n")
  with pytest.raises(ValueError, match=r"keys.txt:1: expected 'name key"):
    read_keys_file(str(path))
  path.write_text("a k1 5\nb k2 0 0\n")
  a, b = read_keys_file(str(path))
  assert (a.bucket.rate, a.bucket.burst) == (5.0, 5.0) and b.bucket is None
  err = _serve_refuses(tmp_path / "nowhere", "--api-keys-file", str(tmp_path / "missing.txt"))
  assert "missing.txt" in err
