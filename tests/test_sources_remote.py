"""Remote sources against real servers on 127.0.0.1: an HTTP server (404, timeout, truncated
body, flaky 503, concurrency) and moto's S3 server (class-per-folder prefix, CSV of s3:// URIs,
an ingested dataset read back from S3)."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request

import ml_collections
import pytest

import corpus
from jaxclf.data import ingest
from jaxclf.data.dataset import DataError, load_dataset
from jaxclf.data.sources import ingested, remote


def free_port() -> int:
  from conftest import free_port as worker_port  # noqa: PLC0415  (per-worker port range)
  return worker_port()


def cfg_for(source, **kw):
  base = dict(source=str(source), val_fraction=0.2, test_fraction=0.2, split_seed=0, channels=3,
              max_pixels=64_000_000, limit_per_split=0, cache_dir="")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def opts(out, **kw):
  return ingest.IngestOptions(out=str(out), **{"val_fraction": 0.2, "test_fraction": 0.2,
                                               "http_timeout": 1.0, "http_retries": 2, **kw})


def content(ds):
  return {s: sorted((hashlib.sha256(ds.splits[s].source[i]["image"]).hexdigest(),
                     ds.splits[s].source[i]["label"]) for i in range(len(ds.splits[s].source)))
          for s in ds.splits}


# ------------------------------------------------------------------------------ HTTP server

class _Handler(http.server.BaseHTTPRequestHandler):
  """/files/<name>: the file; /slow/<name>: waits 3 s first; /truncated/<name>: promises more
  bytes than it sends; /flaky/<name>: 503 twice per name, then the file; /missing: 404."""
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    pass

  def do_GET(self):
    srv = self.server
    with srv.lock:
      srv.active += 1
      srv.max_active = max(srv.max_active, srv.active)
      srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
      hits = srv.hits[self.path]
    try:
      kind, _, name = self.path.lstrip("/").partition("/")
      path = os.path.join(srv.root, name)
      if kind == "hold":  # counted while held only: the count drops before the answer goes
        with srv.lock:     # out, so a client's next request cannot overlap a finished one
          srv.holding += 1
          srv.max_holding = max(srv.max_holding, srv.holding)
        time.sleep(0.3)
        with srv.lock:
          srv.holding -= 1
        kind = "files"
      if kind == "slow":
        time.sleep(3)
      if kind == "flaky" and hits <= 2:
        return self._send(503, b"busy")
      if kind not in ("files", "slow", "flaky", "truncated") or not os.path.isfile(path):
        return self._send(404, b"not found")
      data = open(path, "rb").read()
      if kind == "truncated":
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        return
      self._send(200, data)
    except (BrokenPipeError, ConnectionResetError):
      pass
    finally:
      with srv.lock:
        srv.active -= 1

  def _send(self, code, body):
    self.send_response(code)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)


@pytest.fixture
def http_server(tmp_path):
  root = tmp_path / "www"
  root.mkdir()
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.root, srv.lock, srv.active, srv.max_active, srv.hits = str(root), threading.Lock(), 0, 0, {}
  srv.holding = srv.max_holding = 0
  srv.daemon_threads = True
  t = threading.Thread(target=srv.serve_forever, daemon=True)
  t.start()
  srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
  yield srv
  srv.shutdown()
  srv.server_close()


def _serve(srv, name, data):
  with open(os.path.join(srv.root, name), "wb") as f:
    f.write(data)


def test_http_fetcher_404_timeout_truncation_retries(http_server):
  png = corpus.items()[5].data
  _serve(http_server, "a.png", png)
  f = remote.HttpFetcher(timeout=0.5, retries=2, backoff=0.01)
  assert f.get(f"{http_server.base}/files/a.png") == (png, None)

  data, err = f.get(f"{http_server.base}/files/nope.png")
  assert data is None and err.startswith("HTTP 404")
  assert http_server.hits["/files/nope.png"] == 1  # a 404 is final: no retry

  data, err = f.get(f"{http_server.base}/slow/a.png")
  assert data is None and "timed out" in err and "3 attempts" in err
  data, err = f.get(f"{http_server.base}/truncated/a.png")
  assert data is None and "truncated body" in err
  assert http_server.hits["/truncated/a.png"] == 3

  assert f.get(f"{http_server.base}/flaky/a.png") == (png, None)  # two 503s, then success
  assert http_server.hits["/flaky/a.png"] == 3


def test_http_concurrency_limit_holds_across_threads(http_server):
  _serve(http_server, "a.png", b"x" * 100)
  f = remote.HttpFetcher(timeout=5, concurrency=3)
  threads = [threading.Thread(target=f.get, args=(f"{http_server.base}/hold/a.png",))
             for _ in range(12)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # The server's own count: its handler thread's bookkeeping after the response (`active`) can
  # lag the client's next request under load, so it counts requests while they are held.
  assert f.max_in_flight == 3 and http_server.max_holding == 3
  assert http_server.hits["/hold/a.png"] == 12


def test_ingest_csv_of_http_urls_skips_failures_with_reasons(http_server, tmp_path):
  good = corpus.good_items()[:6]
  for it in good:
    _serve(http_server, it.name, it.data)
  rows = ["uri,label"]
  rows += [f"{http_server.base}/files/{it.name},{'a' if i % 2 else 'b'}" for i, it in enumerate(good)]
  rows += [f"{http_server.base}/files/gone.png,a", f"{http_server.base}/slow/{good[0].name},a",
           f"{http_server.base}/truncated/{good[1].name},b"]
  (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
  m = ingest.ingest(str(tmp_path / "l.csv"), opts(tmp_path / "ds", http_timeout=0.5,
                                                  http_retries=1))
  assert m["num_records"] == 6 and m["report"]["num_skipped"] == 3
  reasons = {s["path"].split("/")[3]: s["reason"] for s in m["report"]["skipped"]}
  assert reasons["files"].startswith("HTTP 404")
  assert "timed out" in reasons["slow"] and "truncated body" in reasons["truncated"]
  assert all(s["stage"] == "read" for s in m["report"]["skipped"])
  ds = load_dataset(cfg_for(tmp_path / "ds"))
  assert ds.version == m["version"]
  assert sum(len(s.labels) for s in ds.splits.values()) == 6


def test_ingest_tar_gz_over_https_url(http_server, tmp_path):
  folder = tmp_path / "photos"
  corpus.write_class_folder(str(folder), {"cat": 5, "dog": 5}, size=(10, 10))
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tf:
    tf.add(folder, arcname="photos")
  _serve(http_server, "photos.tar.gz", buf.getvalue())
  url = f"{http_server.base}/files/photos.tar.gz"
  m = ingest.ingest(url, opts(tmp_path / "ds"))
  assert m["num_records"] == 10 and m["classes"] == ["cat", "dog"]
  assert ingested.read_records(str(tmp_path / "ds"), m)["train"][0]["uri"].startswith(url + "#")
  local = load_dataset(cfg_for(folder))
  assert m["version"] == local.version  # same pictures, labels and splits as the folder
  with pytest.raises(DataError, match="HTTP 404"):
    ingest.ingest(f"{http_server.base}/files/none.tar.gz", opts(tmp_path / "ds2"))


# ------------------------------------------------------------------------------ S3 (moto)

@pytest.fixture
def bucket(s3_bucket):
  return s3_bucket


def _upload_tree(s3, bucket, folder, prefix):
  for dirpath, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(dirpath, f)
      key = prefix + "/" + os.path.relpath(path, folder).replace(os.sep, "/")
      s3.upload_file(path, bucket, key)


def test_s3_class_folder_prefix_ingest_matches_local(bucket, tmp_path):
  s3, name = bucket
  folder = tmp_path / "photos"
  corpus.write_class_folder(str(folder), {"cat": 6, "dog": 6}, size=(10, 10), nested=True)
  (folder / "cat" / "truncated.jpg").write_bytes(corpus.bad_items()[3].data)
  _upload_tree(s3, name, folder, "photos")
  s3.put_object(Bucket=name, Key="photos/README.txt", Body=b"loose file")
  m = ingest.ingest(f"s3://{name}/photos/", opts(tmp_path / "ds"))
  assert m["num_records"] == 12 and m["classes"] == ["cat", "dog"]
  assert [s["path"] for s in m["report"]["skipped"]] == [f"s3://{name}/photos/cat/truncated.jpg"]
  assert m["report"]["skipped"][0]["stage"] == "decode"
  assert m["version"] == load_dataset(cfg_for(folder)).version


def test_s3_given_splits_and_csv_of_s3_uris(bucket, tmp_path):
  s3, name = bucket
  tree = tmp_path / "t"
  corpus.write_class_folder(str(tree / "train"), {"a": 6, "b": 6}, size=(8, 8))
  corpus.write_class_folder(str(tree / "test"), {"a": 2, "b": 2}, size=(8, 8), start_seed=300)
  _upload_tree(s3, name, tree, "split")
  m = ingest.ingest(f"s3://{name}/split", opts(tmp_path / "ds", val_fraction=0.25))
  assert m["splits"]["test"]["count"] == 4 and m["provenance"]["given_splits"] == ["test", "train"]
  assert m["splits"]["val"]["count"] + m["splits"]["train"]["count"] == 12
  assert all(n >= 1 for n in m["splits"]["val"]["per_class"].values())  # carved from train

  keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="split/train/")["Contents"]]
  csv = "uri,label\n" + "".join(f"s3://{name}/{k},{k.split('/')[2]}\n" for k in keys)
  csv += f"s3://{name}/split/train/a/missing.png,a\n"
  s3.put_object(Bucket=name, Key="labels.csv", Body=csv.encode())
  m2 = ingest.ingest(f"s3://{name}/labels.csv", opts(tmp_path / "ds2"))
  assert m2["num_records"] == 12
  assert m2["report"]["skipped"][0]["reason"] == "no such S3 object"


def test_ingested_dataset_read_back_from_s3(bucket, tmp_path):
  s3, name = bucket
  folder = tmp_path / "photos"
  corpus.write_class_folder(str(folder), {"cat": 8, "dog": 8}, size=(12, 12), fmt="JPEG", ext=".jpg")
  out = tmp_path / "ds"
  m = ingest.ingest(str(folder), opts(out, shard_mb=0.002))
  _upload_tree(s3, name, out, "datasets/pets-v1")
  cache = tmp_path / "cache"
  ds = load_dataset(cfg_for(f"s3://{name}/datasets/pets-v1", cache_dir=str(cache)))
  assert ds.version == m["version"]
  assert content(ds) == content(load_dataset(cfg_for(out)))
  cached = sorted(os.listdir(cache / "ingested" / m["version"]))
  assert sum(n.endswith(".array_record") for n in cached) == sum(
      len(s["shards"]) for s in m["splits"].values())

  # A shard that does not match the manifest's sha256 is refused, not silently read.
  bad = m["splits"]["train"]["shards"][0]["file"]
  s3.put_object(Bucket=name, Key=f"datasets/pets-v1/{bad}", Body=b"tampered")
  shutil.rmtree(cache)
  with pytest.raises(DataError, match=f"{bad}: sha256 .* does not match the manifest"):
    load_dataset(cfg_for(f"s3://{name}/datasets/pets-v1", cache_dir=str(cache)))
  with pytest.raises(DataError, match="not an ingested dataset"):
    ingested.read_manifest(f"s3://{name}/nothing-here")
