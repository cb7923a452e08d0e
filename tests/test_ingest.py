"""`jaxclf data ingest|info|diff` on real files: shards + manifest, resumability after kill -9,
idempotence, archives (safe extraction), CSV/JSONL manifests, reading back through Grain."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile

import ml_collections
import numpy as np
import pytest

import corpus
from jaxclf.data import data_cli, decode, ingest, ingest_shards
from jaxclf.data.dataset import DataError, load_dataset
from jaxclf.data.sources import archive, image_folder, ingested, scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(source, **kw):
  base = dict(source=str(source), val_fraction=0.2, test_fraction=0.2, split_seed=0, channels=3,
              max_pixels=64_000_000, limit_per_split=0, cache_dir="")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def opts(out, **kw):
  return ingest.IngestOptions(out=str(out), **{"val_fraction": 0.2, "test_fraction": 0.2, **kw})


def content(ds):
  """split -> sorted (sha256 of image bytes, label): what a dataset holds, however stored."""
  return {s: sorted((hashlib.sha256(ds.splits[s].source[i]["image"]).hexdigest(),
                     ds.splits[s].source[i]["label"]) for i in range(len(ds.splits[s].source)))
          for s in ds.splits}


@pytest.fixture
def messy_folder(tmp_path):
  root = tmp_path / "photos"
  corpus.write_corpus(str(root / "cat"))
  corpus.write_class_folder(str(root), {"dog": 8}, start_seed=100, nested=True)
  corpus.write_class_folder(str(root), {"eel": 6}, start_seed=200, fmt="JPEG", ext=".jpeg")
  return root


def test_folder_ingest_writes_shards_manifest_and_card(messy_folder, tmp_path):
  out = tmp_path / "ds"
  m = ingest.ingest(str(messy_folder), opts(out, shard_mb=0.005, license="CC-BY-4.0"))
  n_input = len(corpus.items()) + 8 + 6
  assert m["num_records"] + m["report"]["num_skipped"] == n_input
  assert {os.path.basename(s["path"]): s["stage"] for s in m["report"]["skipped"]} == \
      {i.name: i.skip_stage for i in corpus.bad_items()}
  assert m["classes"] == ["cat", "dog", "eel"] and m["license"] == "CC-BY-4.0"
  # Several shards per split (tiny shard_mb), each on disk with the recorded size and sha256.
  assert len(m["splits"]["train"]["shards"]) > 1
  for split in m["splits"].values():
    assert sum(s["records"] for s in split["shards"]) == split["count"]
    for s in split["shards"]:
      assert ingested.sha256_file(out / s["file"]) == s["sha256"]
      assert os.path.getsize(out / s["file"]) == s["bytes"]
  assert m["format_version"] == 2 and "records" not in m  # the index is in Parquet files
  rec = ingested.read_records(str(out), m)["train"][0]
  assert set(rec) >= {"uri", "sha256", "size", "format", "height", "width", "label"}
  assert not (out / ".partial").exists()
  card = (out / "README.md").read_text()
  assert m["version"] in card and "CC-BY-4.0" in card and "truncated.jpg" in card

  # Read back: same records, labels, splits and version as loading the folder directly.
  ds, folder = load_dataset(cfg_for(out)), image_folder.load(cfg_for(messy_folder))
  assert ds.version == folder.version == m["version"]
  assert content(ds) == content(folder)
  assert ds.report["license"] == "CC-BY-4.0"
  for s in ds.splits:
    src = ds.splits[s].source
    for i in range(len(src)):
      r = src[i]
      assert r["label"] == ds.splits[s].labels[i]
      assert decode.decode_image(r["image"], 3).ndim == 3
      header = src.header(i)
      assert header["sha256"] == hashlib.sha256(r["image"]).hexdigest()


def test_records_are_shuffled_so_a_limit_keeps_every_class(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 15, "b": 15, "c": 15}, size=(8, 8))
  out = tmp_path / "ds"
  ingest.ingest(str(root), opts(out))
  ds = load_dataset(cfg_for(out, limit_per_split=6))
  assert len(ds.splits["train"].labels) == 6
  assert len(set(ds.splits["train"].labels.tolist())) >= 2
  assert ds.version == load_dataset(cfg_for(out, limit_per_split=6)).version
  assert ds.version != load_dataset(cfg_for(out)).version


def test_grain_global_shuffle_reads_every_record_once(tmp_path):
  import grain  # noqa: PLC0415 - imports jax; only this test needs it
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 20, "b": 20}, size=(16, 16), fmt="JPEG", ext=".jpg")
  out = tmp_path / "ds"
  ingest.ingest(str(root), opts(out, shard_mb=0.002))
  src = load_dataset(cfg_for(out)).splits["train"].source
  assert len(src.shards) > 2

  def decode_fn(r):
    return {"image": decode.decode_image(r["image"], 3), "label": r["label"]}

  ds = grain.MapDataset.source(src).seed(3).shuffle().map(decode_fn).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  seen = [(r["image"].tobytes(), r["label"]) for r in ds]
  assert len(seen) == len(src) and len(set(seen)) == len(src)
  in_order = [(decode.decode_image(src[i]["image"], 3).tobytes(), src[i]["label"]) for i in range(len(src))]
  assert sorted(seen) == sorted(in_order) and seen != in_order


def test_rerun_is_a_no_op_and_a_changed_source_needs_force(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 6, "b": 6}, size=(8, 8))
  out = tmp_path / "ds"
  m1 = ingest.ingest(str(root), opts(out))
  before = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
  assert ingest.ingest(str(root), opts(out))["version"] == m1["version"]
  assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == before  # nothing rewritten
  corpus.write_class_folder(str(root), {"c": 3}, size=(8, 8), start_seed=900)
  with pytest.raises(DataError, match="already holds a different dataset.*--force"):
    ingest.ingest(str(root), opts(out))
  m2 = ingest.ingest(str(root), opts(out, force=True))
  assert m2["classes"] == ["a", "b", "c"] and m2["version"] != m1["version"]
  assert load_dataset(cfg_for(out)).version == m2["version"]


def _ingest_cmd(src, out, *extra):
  return [sys.executable, "-m", "jaxclf.data.data_cli", "data", "ingest", str(src), "--out",
          str(out), "--shard-mb", "0.02", "--workers", "2", *extra]


def _kill_when(cmd, ready, timeout=60.0):
  """Starts cmd, SIGKILLs it as soon as ready() is true; returns whether it was killed midway."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      if ready():
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
      time.sleep(0.002)
    return False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def tree_bytes(root):
  """relative path -> bytes of every file under root (shards, index/*.parquet, manifest, card)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _lines(path):
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def test_kill_9_midway_then_rerun_is_byte_identical(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 700, "b": 500}, size=(64, 64), fmt="JPEG", ext=".jpg")
  clean, crashed = tmp_path / "clean", tmp_path / "crashed"
  subprocess.run(_ingest_cmd(root, clean), cwd=REPO, check=True, capture_output=True)

  # Killed in the decode-check phase (after the first journaled batch) ...
  partial = crashed / ".partial"
  assert _kill_when(_ingest_cmd(root, crashed), lambda: _lines(partial / "checks.jsonl") >= 1)
  assert not (crashed / "manifest.json").exists()
  # ... then resumed and killed again while writing shards ...
  assert _kill_when(_ingest_cmd(root, crashed), lambda: _lines(partial / "shards.jsonl") >= 2)
  assert not (crashed / "manifest.json").exists()
  assert _lines(partial / "checks.jsonl") >= 1200  # the first run's checks were reused
  # ... and finished by a third run.
  subprocess.run(_ingest_cmd(root, crashed), cwd=REPO, check=True, capture_output=True)
  files = tree_bytes(clean)
  assert any(f.startswith("index/") for f in files)  # the Parquet record index, byte-identical too
  assert files == tree_bytes(crashed)
  m = json.loads((crashed / "manifest.json").read_text())
  assert m["num_records"] == 1200 and len(m["splits"]["train"]["shards"]) > 3


def test_resume_reuses_journaled_checks_and_shards(tmp_path, monkeypatch):
  """The in-process half of the kill -9 test (fast): a run that dies after some shards is
  resumed from the journals and gives the same bytes as a clean run."""
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 30, "b": 30}, size=(16, 16), fmt="JPEG", ext=".jpg")
  clean = tmp_path / "clean"
  ingest.ingest(str(root), opts(clean, shard_mb=0.003))
  crashed = tmp_path / "crashed"
  real_write = ingest_shards.write_shard
  calls = {"n": 0}

  def dying_write(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt  # stands in for a crash in the middle of the shard phase
    return real_write(*a, **kw)

  monkeypatch.setattr(ingest_shards, "write_shard", dying_write)
  with pytest.raises(KeyboardInterrupt):
    ingest.ingest(str(root), opts(crashed, shard_mb=0.003))
  monkeypatch.setattr(ingest_shards, "write_shard", real_write)
  assert _lines(crashed / ".partial" / "shards.jsonl") == 2
  checked_calls = {"n": 0}
  real_check = scan.check_files

  def counting_check(items, **kw):
    checked_calls["n"] += len(items)
    return real_check(items, **kw)

  monkeypatch.setattr(scan, "check_files", counting_check)
  ingest.ingest(str(root), opts(crashed, shard_mb=0.003))
  assert checked_calls["n"] == 0  # every check came from the journal
  assert tree_bytes(clean) == tree_bytes(crashed)


def test_out_inside_the_source_folder_is_refused(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 3, "b": 3}, size=(8, 8))
  with pytest.raises(DataError, match="inside the source folder"):
    ingest.ingest(str(root), opts(root / "out"))
  assert not (root / "out").exists()


def test_stale_partial_state_from_other_options_is_discarded(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 6, "b": 6}, size=(8, 8))
  out = tmp_path / "ds"
  (out / ".partial").mkdir(parents=True)
  (out / ".partial" / "state.json").write_text(json.dumps({"source": "elsewhere", "options": {}}))
  (out / ".partial" / "checks.jsonl").write_text('{"uri": "bogus"}\n')
  (out / "train-00000-of-00009.array_record").write_bytes(b"junk")
  m = ingest.ingest(str(root), opts(out))
  assert "train-00000-of-00009.array_record" not in os.listdir(out)
  assert m["version"] == image_folder.load(cfg_for(root)).version


# ---------------------------------------------------------------------------- archives

def _class_tree_bytes():
  files = {}
  for cls, seed in (("cat", 0), ("dog", 50)):
    for i in range(5):
      img = corpus.Image.fromarray(corpus.patterned(12, 12, seed + i))
      files[f"photos/{cls}/{i}.png"] = corpus.encode(img, "PNG")
  files["photos/dog/broken.jpg"] = b"\xff\xd8\xff\xe0 nope"
  return files


def _tar(path, files, extra=()):
  with tarfile.open(path, "w:gz") as tf:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
    for info in extra:
      tf.addfile(info, io.BytesIO(b"evil" if info.isfile() else b""))


def test_tar_ingest_refuses_traversal_and_links(tmp_path):
  evil = []
  for name in ("../../escaped.png", "/abs/escaped.png"):
    t = tarfile.TarInfo(name)
    t.size = 4
    evil.append(t)
  link = tarfile.TarInfo("photos/cat/link.png")
  link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
  hard = tarfile.TarInfo("photos/dog/hard.png")
  hard.type, hard.linkname = tarfile.LNKTYPE, "../../../etc/shadow"
  path = tmp_path / "photos.tar.gz"
  _tar(path, _class_tree_bytes(), evil + [link, hard])
  out = tmp_path / "ds"
  m = ingest.ingest(str(path), opts(out))
  assert m["num_records"] == 10 and m["classes"] == ["cat", "dog"]
  stages = {s["path"].split("#", 1)[1]: (s["stage"], s["reason"]) for s in m["report"]["skipped"]}
  assert stages["../../escaped.png"][0] == "archive" and "unsafe" in stages["../../escaped.png"][1]
  assert stages["/abs/escaped.png"][0] == "archive"
  assert "link" in stages["photos/cat/link.png"][1] and "link" in stages["photos/dog/hard.png"][1]
  assert stages["dog/broken.jpg"][0] == "header"
  assert m["num_records"] + m["report"]["num_skipped"] == 10 + 1 + 4
  assert not list(tmp_path.rglob("escaped.png"))
  assert all(r["uri"].startswith(f"{path}#") for r in ingested.read_records(str(out), m)["train"])
  assert load_dataset(cfg_for(out)).version == m["version"]


def test_zip_ingest_and_zip_bomb_guard(tmp_path):
  path = tmp_path / "photos.zip"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, data in _class_tree_bytes().items():
      zf.writestr(name, data)
    zf.writestr("../outside.png", b"x")
    sym = zipfile.ZipInfo("photos/cat/sym.png")
    sym.external_attr = (0o120777 << 16)
    zf.writestr(sym, "/etc/passwd")
  m = ingest.ingest(str(path), opts(tmp_path / "ds"))
  assert m["num_records"] == 10
  reasons = {s["path"].split("#", 1)[1]: s["reason"] for s in m["report"]["skipped"]}
  assert "unsafe" in reasons["../outside.png"] and "link" in reasons["photos/cat/sym.png"]

  bomb = tmp_path / "bomb.zip"
  with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("a/zeros.png", b"\0" * (4 << 20))  # 4 MB of zeros compresses to ~4 KB
  assert os.path.getsize(bomb) < 64 * 1024
  with pytest.raises(DataError, match="archive bomb guard"):
    archive.extract(str(bomb), str(tmp_path / "x"), max_member_bytes=1 << 20)
  with pytest.raises(DataError, match="archive bomb guard"):
    archive.extract(str(bomb), str(tmp_path / "y"), max_total_bytes=1 << 20)


def test_not_an_archive_is_a_clear_error(tmp_path):
  bad = tmp_path / "photos.tar.gz"
  bad.write_bytes(b"definitely not gzip")
  with pytest.raises(DataError, match="photos.tar.gz: not a readable archive"):
    ingest.ingest(str(bad), opts(tmp_path / "ds"))


# ---------------------------------------------------------------------------- CSV / JSONL

def _labelled_files(tmp_path, n=6):
  d = tmp_path / "imgs"
  paths = corpus.write_class_folder(str(d), {"x": n}, size=(10, 10))["x"]
  return [os.path.relpath(p, tmp_path) for p in paths]


def test_csv_manifest_with_header_relative_paths_and_splits(tmp_path):
  rel = _labelled_files(tmp_path, 8)
  (tmp_path / "imgs" / "bad.jpg").write_bytes(b"")
  rows = [("path", "class", "split")] + [(p, "even" if i % 2 == 0 else "odd",
                                          "test" if i >= 6 else "train") for i, p in enumerate(rel)]
  rows.append((os.path.join("imgs", "bad.jpg"), "odd", "train"))
  rows.append(("imgs/missing.png", "even", "train"))
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)
  m = ingest.ingest(str(tmp_path / "labels.csv"), opts(tmp_path / "ds", val_fraction=0.25))
  assert m["classes"] == ["even", "odd"]
  assert m["splits"]["test"]["count"] == 2 and m["splits"]["val"]["count"] > 0
  skipped = {os.path.basename(s["path"]): s for s in m["report"]["skipped"]}
  assert skipped["bad.jpg"]["stage"] == "read" and skipped["missing.png"]["stage"] == "read"
  assert "cannot read" in skipped["missing.png"]["reason"]
  assert m["num_records"] == 8 and m["provenance"]["kind"] == "csv"


def test_jsonl_manifest_and_headerless_csv_and_row_errors(tmp_path):
  rel = _labelled_files(tmp_path, 6)
  lines = [json.dumps({"uri": os.path.join(str(tmp_path), p), "label": str(i % 3)})
           for i, p in enumerate(rel)]
  (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
  m = ingest.ingest(str(tmp_path / "l.jsonl"), opts(tmp_path / "ds1", val_fraction=0.0,
                                                    test_fraction=0.0))
  assert m["classes"] == ["0", "1", "2"] and m["splits"]["train"]["count"] == 6
  (tmp_path / "plain.csv").write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate(rel)))
  m2 = ingest.ingest(str(tmp_path / "plain.csv"), opts(tmp_path / "ds2", val_fraction=0.0,
                                                       test_fraction=0.0))
  assert m2["num_records"] == 6 and m2["classes"] == ["0", "1"]
  (tmp_path / "broken.csv").write_text("uri,label\nimgs/a.png,cat\nimgs/b.png,\n")
  with pytest.raises(DataError, match=r"broken.csv:3: no label"):
    ingest.ingest(str(tmp_path / "broken.csv"), opts(tmp_path / "ds3"))
  (tmp_path / "bad.jsonl").write_text('{"uri": "a.png", "label": "x"}\n{nope\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
    ingest.ingest(str(tmp_path / "bad.jsonl"), opts(tmp_path / "ds4"))


# ------------------------------------------------------------------------------ CLI

def test_cli_info_and_diff(messy_folder, tmp_path, capsys):
  out_a = tmp_path / "a"
  assert data_cli.main(["data", "ingest", str(messy_folder), "--out", str(out_a),
                        "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["records"] + summary["skipped"] == len(corpus.items()) + 14

  assert data_cli.main(["data", "info", str(out_a)]) == 0
  text = capsys.readouterr().out
  assert "imbalance ratio" in text and "truncated.jpg" in text and "WEBP 3" in text
  assert data_cli.main(["data", "info", str(out_a), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["splits"]["train"]["count"] == summary["splits"]["train"]
  assert info["imbalance_ratio"] == pytest.approx(len(corpus.good_items()) / 6)

  # B: one file removed, one added, one moved to another class.
  os.remove(messy_folder / "dog" / "dog_0000.png")
  corpus.write_class_folder(str(messy_folder), {"eel": 1}, start_seed=999)
  shutil.move(str(messy_folder / "eel" / "eel_0001.jpeg"), messy_folder / "dog" / "moved.jpeg")
  assert data_cli.main(["data", "diff", str(out_a), str(messy_folder), "--json",
                        "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
  d = json.loads(capsys.readouterr().out)
  assert d["records_added"] == 1 and d["records_removed"] == 1 and d["relabelled"] == 1
  assert not d["same_version"]
  assert data_cli.main(["data", "diff", str(out_a), str(out_a)]) == 0
  assert "identical" in capsys.readouterr().out
  assert data_cli.main(["data", "info", str(tmp_path / "nope")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_one_file_and_parquet_index_layouts_read_alike(tmp_path, capsys):
  """format_version 2 (summary in manifest.json, records in index/*.parquet) and the one-file
  format_version 1 (`--index json`, what older jaxclf wrote) hold the same dataset: training,
  `data info` and `data diff` read either, and a v1 manifest from before the index still loads."""
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 12, "b": 12}, size=(8, 8))
  v2, v1 = tmp_path / "v2", tmp_path / "v1"
  m2 = ingest.ingest(str(root), opts(v2, shard_mb=0.001))
  m1 = ingest.ingest(str(root), opts(v1, shard_mb=0.001, index="json"))
  assert m2["format_version"] == 2 and "records" not in m2 and m2["index"]["format"] == "parquet"
  assert m1["format_version"] == 1 and "index" not in m1
  assert len(m2["index"]["files"]["train"]) == len(m2["splits"]["train"]["shards"]) > 1
  assert ingested.read_records(str(v2), m2) == m1["records"]
  assert content(load_dataset(cfg_for(v2))) == content(load_dataset(cfg_for(v1)))
  assert load_dataset(cfg_for(v2)).version == load_dataset(cfg_for(v1)).version == m2["version"]
  # A limited load (first n records per split) reads the same prefix from either layout.
  assert content(load_dataset(cfg_for(v2, limit_per_split=5))) == \
      content(load_dataset(cfg_for(v1, limit_per_split=5)))
  assert data_cli.main(["data", "diff", str(v1), str(v2)]) == 0
  assert "identical" in capsys.readouterr().out
  assert data_cli.main(["data", "info", str(v2), "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["version"] == m2["version"]
  # A truncated index file is a clear error naming it.
  bad = v2 / m2["index"]["files"]["train"][0]["file"]
  bad.write_bytes(bad.read_bytes()[:20])
  with pytest.raises(DataError, match="not a readable Parquet index"):
    load_dataset(cfg_for(v2))


def test_ingested_load_errors_are_clear(tmp_path):
  (tmp_path / "ds").mkdir()
  (tmp_path / "ds" / "manifest.json").write_text("{not json")
  with pytest.raises(DataError, match="manifest.json: not valid JSON"):
    load_dataset(cfg_for(tmp_path / "ds"))
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 4, "b": 4}, size=(8, 8))
  m = ingest.ingest(str(root), opts(tmp_path / "ok"))
  os.remove(tmp_path / "ok" / m["splits"]["train"]["shards"][0]["file"])
  with pytest.raises(DataError, match="shard train-00000-of-00001.array_record is missing"):
    load_dataset(cfg_for(tmp_path / "ok"))


# ------------------------------------------------------------------------------ Fashion-MNIST

@pytest.mark.slow
def test_fashion_mnist_ingest_is_lossless_png(tmp_path):
  from jaxclf.data.sources import fashion_mnist  # noqa: PLC0415
  m = ingest.ingest("fashion_mnist", opts(tmp_path / "fm", val_fraction=0.1))
  assert m["num_records"] == 70_000 and m["report"]["num_skipped"] == 0
  assert m["splits"]["test"]["count"] == 10_000 and m["license"].startswith("MIT")
  assert set(m["report"]["formats"]) == {"PNG"}
  ds = load_dataset(cfg_for(tmp_path / "fm", channels=1))
  raw = fashion_mnist.load_arrays()["test"]
  src = ds.splits["test"].source
  for i in range(0, 10_000, 997):
    header = src.header(i)
    k = int(header["uri"].rsplit("/", 1)[1])
    assert np.array_equal(decode.decode_image(src[i]["image"], 1), raw[0][k])
    assert src[i]["label"] == raw[1][k]


# ------------------------------------------------------------------------------ TFDS

_TFDS_PREPARE = r'''
import io, sys
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

class TinyShapes(tfds.core.GeneratorBasedBuilder):
  """Prepared without TensorFlow: images are handed to TFDS already PNG-encoded."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(names=["dark", "light"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 10), "test": self._generate_examples(10, 4)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      buf = io.BytesIO()
      Image.fromarray(np.full((8, 8, 3), 20 + 15 * i, np.uint8)).save(buf, "PNG")
      yield i, {"image": io.BytesIO(buf.getvalue()), "label": int(i % 2)}

TinyShapes(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
'''


def test_tfds_source_prepared_without_tensorflow(tmp_path):
  data_dir = tmp_path / "tfds"
  subprocess.run([sys.executable, "-c", _TFDS_PREPARE, str(data_dir)], check=True,
                 capture_output=True, cwd=tmp_path)
  m = ingest.ingest("tfds:tiny_shapes", opts(tmp_path / "ds", tfds_data_dir=str(data_dir),
                                             val_fraction=0.2))
  assert m["classes"] == ["dark", "light"] and m["num_records"] == 14
  assert m["splits"]["test"]["count"] == 4 and m["splits"]["val"]["count"] == 2
  assert m["report"]["formats"] == {"PNG": 14}
  ds = load_dataset(cfg_for(tmp_path / "ds"))
  src = ds.splits["test"].source
  seen = set()
  for i in range(len(src)):
    img = decode.decode_image(src[i]["image"], 3)
    key = (int(img[0, 0, 0]) - 20) // 15  # TFDS stores examples in its own (hashed) order
    assert img[0, 0].tolist() == [20 + 15 * key] * 3 and src[i]["label"] == key % 2
    seen.add(key)
  assert seen == {10, 11, 12, 13}  # exactly TFDS's test split
  with pytest.raises(DataError, match="no prepared copy readable"):
    ingest.ingest("tfds:not_prepared_here", opts(tmp_path / "ds2", tfds_data_dir=str(data_dir)))


@pytest.mark.slow
def test_larger_than_ram_epoch_streams_in_flat_memory():
  """>= 4 GB of encoded images, one shuffled epoch through Grain, peak RSS < 1 GB (minutes)."""
  out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "data.py"), "--larger-than-ram",
                        "--gb", "4"], cwd=REPO, check=True, capture_output=True, text=True)
  res = json.loads(out.stdout)["larger_than_ram"]
  assert res["dataset"]["encoded_bytes"] >= 4 * 1024 ** 3
  assert res["images_epoch"] == res["dataset"]["records"]
  assert res["peak_rss_mb"] < 1024 and res["ratio_data_over_peak_rss"] >= 4
