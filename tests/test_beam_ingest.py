"""The Beam ingest (`jaxclf data ingest --runner=direct`, in .venv-beam) against the local path:
same version, same per-split records, same shard bytes; bad input as skips; clear failures.

Needs .venv-beam: `bash scripts/setup_beam_env.sh` (scripts/test.sh runs it before the tests).
The pipeline runs in that environment through the CLI's own re-execution, as a user runs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import corpus
from jaxclf.data import data_cli, ingest
from jaxclf.data.dataset import DataError, load_dataset
from jaxclf.data.sources import ingested

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_PY = os.path.join(REPO, ".venv-beam", "bin", "python")
MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def beam_python():
  assert os.access(BEAM_PY, os.X_OK), "needs the Beam env: bash scripts/setup_beam_env.sh"
  return BEAM_PY


def opts(out, **kw):
  return ingest.IngestOptions(out=str(out), **{"val_fraction": 0.2, "test_fraction": 0.2,
                                               "shard_mb": 0.02, **kw})


def beam_cmd(src, out, *extra):
  """`jaxclf data ingest SRC --out OUT --runner=direct ...` from the training env (.venv): the
  CLI re-executes itself in .venv-beam."""
  return [sys.executable, "-m", "jaxclf.data.data_cli", "data", "ingest", str(src), "--out",
          str(out), "--val-fraction", "0.2", "--test-fraction", "0.2", "--shard-mb", "0.02",
          "--runner=direct", *extra]


def beam_ingest(src, out, *extra, check=True, timeout=240):
  r = subprocess.run(beam_cmd(src, out, *extra), cwd=REPO, capture_output=True, text=True,
                     timeout=timeout)
  if check:
    assert r.returncode == 0, r.stderr[-3000:]
  return r


def records(out):
  """split -> [(sha256, label, uri)] in shard order, and the shard files' sha256."""
  m = ingested.read_manifest(str(out))
  recs = {s: [(r["sha256"], r["label"], r["uri"]) for r in rs]
          for s, rs in ingested.read_records(str(out), m).items()}
  shards = {s["file"]: ingested.sha256_file(os.path.join(out, s["file"]))
            for split in m["splits"].values() for s in split["shards"]}
  return m, recs, shards


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
  """The hostile-format corpus (every format and mode users upload, plus corrupt, truncated,
  empty, non-image and bomb files) as one class, 340 generated images in four more, and exact duplicates: within a class, and across classes (a label conflict)."""
  root = tmp_path_factory.mktemp("beam") / "photos"
  corpus.write_corpus(str(root / "mixed"))
  made = corpus.write_class_folder(str(root), {"ant": 110, "bee": 90, "cow": 100}, size=(12, 12),
                                   start_seed=500, nested=True)
  made.update(corpus.write_class_folder(str(root), {"jpg": 40}, size=(16, 16), fmt="JPEG",
                                        ext=".jpg", start_seed=900))
  shutil.copy(made["ant"][0], root / "ant" / "copy_of_ant0.png")
  shutil.copy(made["ant"][1], root / "ant" / "more" / "copy_of_ant1.png")
  shutil.copy(made["bee"][0], root / "cow" / "bee0_in_cow.png")
  return root


def test_beam_direct_runner_matches_the_local_path(hostile_folder, tmp_path, beam_python):
  local = tmp_path / "local"
  m_local = ingest.ingest(str(hostile_folder), opts(local))
  beam = tmp_path / "beam"
  r = beam_ingest(hostile_folder, beam, *MULTI)
  assert json.loads(r.stdout.strip().splitlines()[-1])["version"] == m_local["version"]

  m_beam, recs_beam, shards_beam = records(beam)
  _, recs_local, shards_local = records(local)
  assert m_beam["version"] == m_local["version"]
  assert m_beam["provenance"]["engine"] == "beam:DirectRunner"
  assert recs_beam == recs_local  # same records, splits and order within every shard
  assert shards_beam == shards_local  # byte-identical ArrayRecord shards
  assert len(shards_beam) > 3
  for key in ("classes", "num_records", "splits", "license"):
    assert m_beam[key] == m_local[key], key
  rb, rl = m_beam["report"], m_local["report"]
  for key in ("per_class", "per_split", "exact_duplicates", "near_duplicates", "formats",
              "bytes", "image_size", "num_input", "num_skipped"):
    assert rb[key] == rl[key], key
  # Corrupt, truncated, empty, non-image and bomb files: skip records with path, stage, reason.
  stages = {os.path.basename(s["path"]): s["stage"] for s in rb["skipped"]}
  assert stages == {i.name: i.skip_stage for i in corpus.bad_items()}
  assert all(s["reason"] for s in rb["skipped"])
  assert rb["num_skipped"] == len(corpus.bad_items())  # counted in the manifest
  assert rb["near_duplicates"]["count"] > 0  # the corpus's re-encodes, found by Beam's buckets
  assert [s["path"] for s in rb["skipped"]] == [s["path"] for s in rl["skipped"]]
  # The corpus has 2 duplicate pairs of its own (wrong extension, no extension); we added 3.
  assert rb["exact_duplicates"]["groups"] == 5 and len(rb["exact_duplicates"]["label_conflicts"]) == 1
  # Exact duplicates never straddle splits.
  split_of = {}
  for split, rs in recs_beam.items():
    for sha, _, _ in rs:
      assert split_of.setdefault(sha, split) == split
  assert not (beam / ".partial-beam").exists() and not (beam / ".partial-beam-list").exists()
  # It is a dataset like any other: it loads with the same version and records.
  ds = load_dataset(_cfg(beam))
  assert ds.version == m_local["version"] and len(ds.splits["train"].labels) == m_local["splits"]["train"]["count"]


def _cfg(source):
  import ml_collections  # noqa: PLC0415
  return ml_collections.ConfigDict(dict(source=str(source), val_fraction=0.2, test_fraction=0.2,
                                        split_seed=0, channels=3, max_pixels=64_000_000,
                                        limit_per_split=0, cache_dir=""))


@pytest.mark.slow  # a third Beam pipeline, killed and rerun; test_ingest.py kills the local path
def test_beam_given_splits_csv_manifest_and_rerun_after_kill(tmp_path, beam_python):
  """Given train/test folders (val carved from train), a copy of a test image in train (skipped
  as a dedupe record, kept in test), through a CSV manifest, near-duplicate report off; a run
  killed midway and rerun gives the same version and shards as the local path."""
  root = tmp_path / "given"
  made = corpus.write_class_folder(str(root / "train"), {"a": 30, "b": 25}, size=(10, 10))
  corpus.write_class_folder(str(root / "test"), {"a": 6, "b": 6}, size=(10, 10), start_seed=700)
  shutil.copy(root / "test" / "a" / "a_0000.png", root / "train" / "a" / "leak.png")
  rows = ["uri,label,split"] + [
      f"{os.path.relpath(p, root)},{cls},{split}"
      for split in ("train", "test") for cls in ("a", "b")
      for p in sorted(str(x) for x in (root / split / cls).iterdir())]
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  assert made
  src = root / "labels.csv"
  m_local = ingest.ingest(str(src), opts(tmp_path / "local", near_duplicates=False))
  assert any(s["stage"] == "dedupe" for s in m_local["report"]["skipped"])

  out = tmp_path / "beam"
  proc = subprocess.Popen(beam_cmd(src, out, "--no-near-duplicates"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.monotonic() + 120
  while not (out / ".partial-beam" / "candidates").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its .venv-beam child, mid-pipeline
  proc.wait(30)
  assert not (out / ingested.MANIFEST).exists()

  beam_ingest(src, out, "--no-near-duplicates")
  m_beam, recs_beam, shards_beam = records(out)
  _, recs_local, shards_local = records(tmp_path / "local")
  assert m_beam["version"] == m_local["version"]
  assert recs_beam == recs_local and shards_beam == shards_local
  assert m_beam["report"]["skipped"] == m_local["report"]["skipped"]
  assert m_beam["splits"]["val"]["count"] > 0  # carved out of train, as the local path does
  assert m_beam["report"]["near_duplicates"] == m_local["report"]["near_duplicates"]
  assert m_beam["report"]["near_duplicates"]["checked"] is False  # --no-near-duplicates


def test_beam_bad_sources_fail_with_one_clear_error(tmp_path, beam_python):
  # Unreachable: a manifest on a server that is not there (a closed port on 127.0.0.1).
  import socket  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  r = beam_ingest(f"http://127.0.0.1:{port}/labels.csv", tmp_path / "o1", "--http-retries", "0",
                  check=False)
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "labels.csv" in lines[0] and "connection failed" in lines[0], r.stderr
  assert "Traceback" not in r.stderr

  # Zero valid images: every file corrupt -> fails before any shard is written.
  root = tmp_path / "junk"
  for cls in ("x", "y"):
    corpus.write_corpus(str(root / cls), corpus.bad_items())
  out = tmp_path / "o2"
  r = beam_ingest(root, out, check=False)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "every file of class(es) ['x', 'y'] was skipped" in r.stderr
  with pytest.raises(DataError, match=r"every file of class\(es\) \['x', 'y'\] was skipped"):
    ingest.ingest(str(root), opts(tmp_path / "o3"))  # the same message as the local path
  written = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if "array_record" in f]
  assert written == [] and not (out / ingested.MANIFEST).exists()


def test_runner_without_the_beam_env_names_the_setup_command(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("JAXCLF_BEAM_PYTHON", str(tmp_path / "no-such-python"))
  monkeypatch.setattr(data_cli, "beam_python", lambda: None)
  rc = data_cli.main(["data", "ingest", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--runner=direct", "--direct_num_workers=2"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "bash scripts/setup_beam_env.sh" in err and ".venv-beam" in err
  # Without --runner the local path runs, and pipeline options are refused by name.
  rc = data_cli.main(["data", "ingest", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--direct_num_workers=2"])
  assert rc == 2 and "--direct_num_workers=2" in capsys.readouterr().err


def test_beam_pipeline_imports_only_jax_free_modules(beam_python):
  """.venv-beam has no jax; the pipeline module and the CLI import there, and pull in nothing
  of the training stack."""
  code = ("import sys, importlib.util\n"
          "import jaxclf.data.beam_ingest, jaxclf.data.data_cli\n"
          "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'grain', 'tensorflow'))\n"
          "assert not heavy, heavy\n"
          "assert importlib.util.find_spec('jax') is None\n"
          "import apache_beam, google.protobuf, pyarrow\n"
          "print(apache_beam.__version__, google.protobuf.__version__, pyarrow.__version__)\n")
  r = subprocess.run([beam_python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  beam_v, pb, pa = r.stdout.split()
  assert beam_v == "2.77.0" and int(pb.split(".")[0]) < 7 and int(pa.split(".")[0]) < 26


def test_class_by_class_draw_reproduces_stratified_split():
  """splits.deal_one_class (one class per worker, the Beam split) == stratified_split (all
  classes in one process), including groups of duplicates and classes with one group."""
  import numpy as np  # noqa: PLC0415
  from jaxclf.data import splits  # noqa: PLC0415
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 7, size=900)
  labels[labels == 3] = 4  # a label with no records at all
  labels[:1] = 6
  labels[labels == 6] = 5
  labels[0] = 6  # a class with a single record
  groups = [f"{int(g):06x}" for g in rng.integers(0, 600, size=900)]  # many duplicate groups
  fractions = {"train": 0.7, "val": 0.2, "test": 0.1}
  for seed in (0, 3):
    want = splits.stratified_split(labels, fractions, seed, groups=groups)
    first = {}
    for i, g in enumerate(groups):
      first.setdefault(g, i)
    size = {g: groups.count(g) for g in first}
    by_class = {}
    for g in sorted(first):
      by_class.setdefault(int(labels[first[g]]), []).append(g)
    per_class = {c: len(gs) for c, gs in by_class.items()}
    split_of = {}
    for c in sorted(by_class, reverse=True):  # any order: each class is dealt on its own
      which = splits.deal_one_class(seed, c, per_class, np.asarray([size[g] for g in by_class[c]]),
                                    fractions)
      split_of.update({g: list(fractions)[w] for g, w in zip(by_class[c], which)})
    got = {n: np.flatnonzero([split_of[g] == n for g in groups]) for n in fractions}
    assert all(np.array_equal(got[n], want[n]) for n in fractions)


@pytest.mark.slow  # a second Beam pipeline; the gs:// test covers object-store output
def test_beam_writes_to_s3_and_training_reads_it_back(hostile_folder, tmp_path, s3_bucket,
                                                     beam_python):
  """--out s3://... (moto's S3 server on 127.0.0.1): temp files and shards are written on S3
  itself (where cluster workers would reach them), the manifest last; training reads it back
  from S3 with the local path's version, and a rerun is a no-op."""
  s3, bucket = s3_bucket
  local = ingest.ingest(str(hostile_folder), opts(tmp_path / "local"))
  url = f"s3://{bucket}/datasets/photos-v1"
  r = beam_ingest(hostile_folder, url)
  assert json.loads(r.stdout.strip().splitlines()[-1])["version"] == local["version"]
  keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
  assert "datasets/photos-v1/manifest.json" in keys
  assert any(k.startswith("datasets/photos-v1/index/") for k in keys)
  assert not any(".partial" in k or ".tmp" in k for k in keys)
  cfg = _cfg(url)
  cfg.cache_dir = str(tmp_path / "cache")
  ds = load_dataset(cfg)
  assert ds.version == local["version"]
  assert sorted(ds.splits["val"].labels.tolist()) == sorted(
      r["label"] for r in ingested.read_records(str(tmp_path / "local"), local)["val"])
  again = beam_ingest(hostile_folder, url)
  assert "is up to date" in again.stderr


# --------------------------------------------------------------------- gs:// (a GCS emulator)

GCS_BUCKET = "jaxclf-test"


@pytest.fixture(scope="module")
def gcs_server(beam_python):
  """gcp-storage-emulator (requirements/beam.txt): GCS's JSON API, in memory, in its own process
  on 127.0.0.1. STORAGE_EMULATOR_HOST points gcsfs at it, in this process and its children."""
  from conftest import free_port, wait_for_http  # noqa: PLC0415
  port = free_port()
  log = open(os.devnull, "wb")
  proc = subprocess.Popen([beam_python, "-m", "gcp_storage_emulator", "start", "--host",
                           "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket",
                           GCS_BUCKET, "--quiet"], stdout=log, stderr=log)
  url = f"http://127.0.0.1:{port}"
  wait_for_http(url + "/", proc, 60,
                "the GCS emulator did not start (bash scripts/setup_beam_env.sh)")
  saved = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = url
  try:
    yield url
  finally:
    if saved is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = saved
    proc.terminate()
    proc.wait(10)
    log.close()


class Gcs:
  """Uploads, listings and downloads through GCS's JSON API with urllib: a client independent of
  the gcsfs that jaxclf uses, to put the source in place and check what was written."""

  def __init__(self, url: str, bucket: str):
    self.url, self.bucket = url, bucket

  def _call(self, url: str, data: bytes | None = None, content_type: str = "") -> bytes:
    import urllib.request  # noqa: PLC0415
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": content_type} if content_type else {})
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.read()

  def put(self, name: str, data: bytes) -> None:
    # A multipart upload (metadata + media), as gcsfs sends small files: the emulator's simple
    # media upload fails on an empty body, and the corpus has an empty file.
    b = "jaxclf-test-boundary"
    body = (f"--{b}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': name})}\r\n--{b}\r\nContent-Type: application/octet-stream"
            "\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    self._call(f"{self.url}/upload/storage/v1/b/{self.bucket}/o?uploadType=multipart", body,
               f"multipart/related; boundary={b}")

  def names(self, prefix: str) -> list[str]:
    from urllib.parse import quote  # noqa: PLC0415
    out, token = [], ""
    while True:
      page = json.loads(self._call(f"{self.url}/storage/v1/b/{self.bucket}/o?prefix="
                                   f"{quote(prefix, safe='')}&pageToken={quote(token)}"))
      out += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(out)

  def get(self, name: str) -> bytes:
    from urllib.parse import quote  # noqa: PLC0415
    return self._call(f"{self.url}/download/storage/v1/b/{self.bucket}/o/{quote(name, safe='')}"
                      "?alt=media")

  def upload_tree(self, folder, prefix: str) -> None:
    for d, _, files in os.walk(folder):
      for f in files:
        rel = os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        with open(os.path.join(d, f), "rb") as fh:
          self.put(f"{prefix}/{rel}", fh.read())

  def download_tree(self, prefix: str, dest) -> None:
    for name in self.names(prefix + "/"):
      path = os.path.join(dest, name[len(prefix) + 1:])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(self.get(name))


def test_beam_reads_and_writes_gs(hostile_folder, tmp_path, gcs_server, beam_python, capsys):
  """A gs:// source prefix (the hostile folder, uploaded) listed and read, and gs:// output
  (shards, Parquet index, manifest last) on the GCS emulator, with 2 worker processes that each
  open their own gcsfs: byte-identical to the same gs:// input ingested into a local folder, the
  local path's version on the same images, readable with `data info gs://...` and by training.
  A CSV manifest of gs:// URIs gives the same version; a bucket that is not there fails with one
  clear error."""
  gcs = Gcs(gcs_server, GCS_BUCKET)
  gcs.upload_tree(hostile_folder, "photos")
  src, url = f"gs://{GCS_BUCKET}/photos", f"gs://{GCS_BUCKET}/datasets/photos-v1"
  r = beam_ingest(src, url, *MULTI)
  version = json.loads(r.stdout.strip().splitlines()[-1])["version"]
  beam_ingest(src, tmp_path / "from-gs")  # the same gs:// input, a local --out

  names = gcs.names("datasets/photos-v1/")
  assert "datasets/photos-v1/manifest.json" in names
  assert any(n.startswith("datasets/photos-v1/index/") and n.endswith(".parquet") for n in names)
  assert not any(".partial" in n or ".tmp" in n for n in names), names
  gcs.download_tree("datasets/photos-v1", tmp_path / "gs-copy")
  m_gs, recs_gs, shards_gs = records(tmp_path / "gs-copy")
  m_lo, recs_lo, shards_lo = records(tmp_path / "from-gs")
  assert m_gs["version"] == m_lo["version"] == version
  assert recs_gs == recs_lo and shards_gs == shards_lo and len(shards_gs) > 3
  for key in ("classes", "num_records", "splits", "report", "license"):
    assert m_gs[key] == m_lo[key], key
  assert all(u.startswith(src + "/") for rs in recs_gs.values() for _, _, u in rs)
  stages = {os.path.basename(s["path"]): s["stage"] for s in m_gs["report"]["skipped"]}
  assert stages == {i.name: i.skip_stage for i in corpus.bad_items()}  # read from gs://, skipped

  # The local path on the local folder: the same version and per-split records (the version
  # hashes sha256, label and split, not where the files lie).
  m_local = ingest.ingest(str(hostile_folder), opts(tmp_path / "local"))
  _, recs_local, _ = records(tmp_path / "local")
  assert m_gs["version"] == m_local["version"]
  assert ({s: sorted(x[:2] for x in rs) for s, rs in recs_gs.items()}
          == {s: sorted(x[:2] for x in rs) for s, rs in recs_local.items()})

  info = subprocess.run([beam_python, "-m", "jaxclf.data.data_cli", "data", "info", url, "--json"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert info.returncode == 0, info.stderr[-3000:]
  s = json.loads(info.stdout)
  assert s["version"] == version and s["records"] == m_gs["num_records"], s
  assert s["source"] == src and s["splits"]["test"]["count"] == m_gs["splits"]["test"]["count"]
  # Training (this process, .venv) reads it from gs:// too: shards copied into the cache and
  # checked against the manifest's sha256.
  cfg = _cfg(url)
  cfg.cache_dir = str(tmp_path / "cache")
  ds = load_dataset(cfg)
  assert ds.version == version
  assert sorted(ds.splits["val"].labels.tolist()) == sorted(r[1] for r in recs_local["val"])

  # A CSV manifest on gs:// naming gs:// objects, checked by the local engine in this process
  # (each object read through gcsfs from its threads): the same version again.
  rows = [f"{src}/{n[len('photos/'):]},{n.split('/')[1]}" for n in gcs.names("photos/")]
  gcs.put("lists/labels.csv", "\n".join(["uri,label", *rows]).encode() + b"\n")
  described = ingest.describe(f"gs://{GCS_BUCKET}/lists/labels.csv", opts(tmp_path / "unused"))
  assert described["version"] == version and described["num_records"] == m_gs["num_records"]

  # A bucket that is not there: listing it (ingest_sources.resolve, which the Beam driver runs too)
  # fails with one clear error.
  rc = data_cli.main(["data", "info", f"gs://no-such-bucket-{os.getpid()}/photos"])
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert rc == 2 and len(lines) == 1 and "no-such-bucket" in lines[0], err
