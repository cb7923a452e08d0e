"""The gateway's hot-path levers (issue #10) change speed, never answers.

  - the fast multipart header match gives what python-multipart's general parser gives;
  - POST /v1/predict straight from the middleware (serving/direct.py) answers byte for byte like
    the same endpoint through the FastAPI router, errors included;
  - decoding from an already opened image (one header parse) gives the pixels decode_image gives;
  - `--workers 2`: two processes on one port, each with the model; reload refused; SIGTERM drains.
Real servers on 127.0.0.1 (tests/test_serving.py's Server); no timing is asserted (speed lives in
bench/serve.py).
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import requests

from test_serving import ADMIN_TOKEN, Server
from test_serving_hardening import export_dir, images  # noqa: F401  (the shared fixtures)


HEADER_CASES = [
    # (Content-Type, boundary, Content-Disposition) as clients send them, and odd ones that must
    # fall through to the general parser with the same result
    ("multipart/form-data; boundary=b", b"b", b'form-data; name="file"; filename="a.png"'),
    ("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
     b"----WebKitFormBoundary7MA4YWxkTrZu0gW", b'form-data; name="file"; filename="x y.png"'),
    ('multipart/form-data; boundary="quoted=b"', b"quoted=b", b'form-data; name="file"'),
    ("multipart/form-data; boundary=a=b", b"a=b", b'form-data; name="file"; filename=""'),
    ("multipart/form-data; boundary=b", b"b", b'form-data; name="f"; filename="caf\xc3\xa9;.png"'),
    ("multipart/form-data; boundary=b", b"b", b'form-data; name="file"; filename="a\\"b.png"'),
    ("multipart/form-data; boundary=b", b"b", b'form-data; name="file"; filename="C:\\x\\a.png"'),
    ("Multipart/Form-Data; Boundary=b", b"b", b"form-data;name=file;filename=a.png"),
    ("multipart/form-data;  boundary=b ", b"b", b"form-data; name=\"file\"; filename*=utf-8''a.png"),
    ("multipart/form-data; boundary=b", b"b", b'attachment; name="file"'),
    ("multipart/form-data; boundary=b", b"b", b'form-data; filename="a.png"'),
    ("multipart/form-data; boundary=b", b"b", b'form-data; name="file"; filename="a.png"; x="1"'),
    ("multipart/form-data; charset=utf-8", b"b", b'form-data; name="file"'),
]


@pytest.mark.parametrize("ctype,boundary,disposition", HEADER_CASES)
def test_fast_multipart_headers_agree_with_the_general_parser(ctype, boundary, disposition):
  from serving.errors import ApiError
  from serving.inputs import parse_multipart
  body = (b"--" + boundary + b"\r\nContent-Disposition: " + disposition +
          b"\r\nContent-Type: image/png\r\n\r\n\x89PNG-bytes\r\n--" + boundary + b"--\r\n")
  results = []
  for fast in (True, False):
    try:
      parts = parse_multipart(body, ctype, 16, fast_headers=fast)
      results.append([(p.name, p.filename, p.content_type, p.data) for p in parts])
    except ApiError as e:
      results.append((e.status, e.code, e.message))
  assert results[0] == results[1]
  assert results[0]  # every case parses or is refused with a reason


def test_decoding_an_opened_image_equals_decoding_the_bytes(images):
  from PIL import Image
  from jaxclf.data.decode import decode_image, open_image, probe
  rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
  for data in images[:2] + [_encode(rgb, "JPEG"), _encode(rgb, "WEBP")]:
    img = open_image(data)
    assert (img.format, img.width, img.height, img.mode) == tuple(vars(probe(data)).values())
    for channels in (1, 3):
      np.testing.assert_array_equal(decode_image(open_image(data), channels),
                                    decode_image(data, channels))


def _encode(img, fmt: str) -> bytes:
  import io
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def test_direct_route_answers_like_the_router(export_dir, tmp_path, images):
  """Same status, headers that matter and body (minus request id and latency) on every case."""
  good = images[0]
  cases = [
      ("ok", {"files": {"file": ("a.png", good, "image/png")}}),
      ("top_k", {"files": {"file": ("a.png", good, "image/png")}, "params": {"top_k": "3"}}),
      ("bad_top_k", {"files": {"file": ("a.png", good)}, "params": {"top_k": "x"}}),
      ("missing_field", {"files": {"other": ("a.png", good)}}),
      ("not_an_image", {"files": {"file": ("a.png", b"hello")}}),
      ("empty", {"files": {"file": ("a.png", b"")}}),
      ("truncated", {"files": {"file": ("a.png", good[:60])}}),
      ("declared_text", {"files": {"file": ("a.txt", good, "text/plain")}}),
      ("json_body", {"data": b"{}", "headers": {"Content-Type": "application/json"}}),
      ("bad_multipart", {"data": b"--x\r\nnope", "headers": {
          "Content-Type": "multipart/form-data; boundary=x"}}),
      ("too_large", {"data": b"x" * (1 << 20), "headers": {
          "Content-Type": "multipart/form-data; boundary=x"}}),
  ]
  answers = {}
  for name, flags in (("direct", ()), ("router", ("--no-predict-fast-path",))):
    srv = Server(export_dir, tmp_path / f"{name}.log", "--max-upload-bytes", "100000", *flags)
    try:
      got = {}
      for case, kw in cases:
        r = requests.post(srv.url + "/v1/predict", timeout=30, **kw)
        body = r.json()
        body.pop("request_id", None)
        body.pop("latency_ms", None)
        assert r.headers["x-request-id"]
        got[case] = (r.status_code, r.headers["content-type"], body)
      got["GET"] = requests.get(srv.url + "/v1/predict", timeout=10).status_code
      text = requests.get(srv.url + "/metrics", timeout=10).text
      got["metric_label"] = 'endpoint="/v1/predict",method="POST",status="200"' in text
      answers[name] = got
    finally:
      srv.stop()
  assert answers["direct"] == answers["router"]
  d = answers["direct"]
  assert d["ok"][0] == 200 and len(d["ok"][2]["predictions"]) == 5
  assert len(d["top_k"][2]["predictions"]) == 3 and d["GET"] == 405 and d["metric_label"]
  assert [d[c][0] for c in ("bad_top_k", "missing_field", "not_an_image", "empty", "truncated",
                            "declared_text", "json_body", "bad_multipart", "too_large")] == [
      422, 422, 415, 422, 422, 415, 415, 400, 413]


def test_workers_share_one_port_refuse_reload_and_drain_on_sigterm(export_dir, tmp_path,
                                                                  images):
  srv = Server(export_dir, tmp_path / "workers.log", "--workers", "2",
               env={"JAXCLF_SERVE_ADMIN_TOKEN": ADMIN_TOKEN})
  try:
    pids = set()
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:  # a new connection each: either worker
      text = requests.get(srv.url + "/metrics", timeout=10).text
      pids |= {line.split('"')[1] for line in text.splitlines()
               if line.startswith("jaxclf_worker_info{")}
    assert len(pids) == 2 and str(srv.proc.pid) not in pids  # the supervisor serves nothing
    for data in images[:4]:
      r = requests.post(srv.url + "/v1/predict", files={"file": ("a.png", data)}, timeout=30)
      assert r.status_code == 200 and len(r.json()["predictions"]) == 5
    r = requests.post(srv.url + "/v1/admin/reload", json={"model_path": str(export_dir)},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "reload_unsupported"
    assert requests.get(srv.url + "/v1/models", timeout=10).json()["limits"]["workers"] == 2
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    for pid in pids:  # the workers drained and exited with it
      assert not _alive(int(pid))
  finally:
    if srv.proc.poll() is None:
      srv.stop()
    else:
      srv._log.close()


def _alive(pid: int) -> bool:
  import os
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_hot_path_settings_validate_and_share_cores():
  from serving.settings import load_settings
  s = load_settings({"workers": 2}, environ={})
  assert s.ort_threads() >= 1 and s.public_limits()["workers"] == 2
  assert load_settings({}, environ={"JAXCLF_SERVE_PREDICT_FAST_PATH": "false"}).predict_fast_path \
      is False
  assert load_settings({}, environ={"JAXCLF_SERVE_INLINE_DECODE_PIXELS": "0"}) \
      .inline_decode_pixels == 0
  assert load_settings({}, environ={"JAXCLF_SERVE_GIL_SWITCH_INTERVAL_MS": "0.5"}) \
      .gil_switch_interval_ms == 0.5
  assert load_settings({}, environ={}).otel_telemetry is False  # opt-in: --otel-telemetry
  for bad in ({"workers": 0}, {"inline_decode_pixels": -1}, {"gil_switch_interval_ms": -1}):
    with pytest.raises(ValueError):
      load_settings(bad, environ={})
