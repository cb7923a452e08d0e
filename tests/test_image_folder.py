"""ImageFolder source on real files: skips with reasons, clear errors, deterministic leak-free splits."""
from __future__ import annotations

import os
import shutil

import ml_collections
import numpy as np
import pytest

import corpus
from jaxclf.data import decode
from jaxclf.data.dataset import DataError, load_dataset
from jaxclf.data.sources import image_folder


def make_cfg(root, **kw) -> ml_collections.ConfigDict:
  base = dict(source=str(root), val_fraction=0.2, test_fraction=0.2, split_seed=0, channels=3,
              max_pixels=64_000_000, limit_per_split=0, cache_dir="")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def all_records(ds):
  return {s: [ds.splits[s].source[i] for i in range(len(ds.splits[s].source))] for s in ds.splits}


@pytest.fixture
def messy_folder(tmp_path):
  """cat: the whole corpus (good + bad files, odd extensions); dog, eel: textured PNG/JPEG."""
  root = tmp_path / "photos"
  corpus.write_corpus(str(root / "cat"))
  corpus.write_class_folder(str(root), {"dog": 6}, start_seed=100, nested=True)
  corpus.write_class_folder(str(root), {"eel": 5}, start_seed=200, fmt="JPEG", ext=".jpeg")
  (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (root / "cat" / "._rgb.jpg").write_bytes(b"AppleDouble")
  (root / "LICENSE.txt").write_text("CC-BY 4.0")
  return root


def test_loads_good_files_and_reports_every_bad_one(messy_folder):
  ds = load_dataset(make_cfg(messy_folder))
  n_input = len(corpus.items()) + 6 + 5
  skipped = ds.report["skipped"]
  loaded = sum(len(s.labels) for s in ds.splits.values())
  assert loaded + len(skipped) == n_input
  assert ds.report["num_input"] == n_input and ds.report["num_loaded"] == loaded
  assert ds.class_names == ["cat", "dog", "eel"]
  assert ds.encoded

  by_name = {os.path.basename(s["path"]): s for s in skipped}
  expected = {i.name: i.skip_stage for i in corpus.bad_items()}
  assert {n: s["stage"] for n, s in by_name.items()} == expected
  assert "0 bytes" in by_name["empty.jpg"]["reason"]
  assert "truncated" in by_name["truncated.jpg"]["reason"]
  assert "not a recognised image" in by_name["notes.jpg"]["reason"]
  assert "exceeds the limit" in by_name["bomb_80mp.png"]["reason"]
  assert all(s["path"].startswith(str(messy_folder)) for s in skipped)

  # Dot-files are ignored (listed), loose top-level files too; neither is a candidate.
  ignored = {os.path.basename(p) for p in ds.report["ignored"]}
  assert {".DS_Store", "._rgb.jpg", "LICENSE.txt"} <= ignored
  assert ds.report["per_class"] == {"cat": len(corpus.good_items()), "dog": 6, "eel": 5}
  assert ds.report["formats"]["WEBP"] == 3 and ds.report["formats"]["GIF"] == 2
  assert ds.report["given_splits"] == []


def test_records_are_encoded_bytes_that_decode_to_their_class(messy_folder):
  ds = load_dataset(make_cfg(messy_folder, channels=1))
  names = {i.name for i in corpus.good_items()}
  src_paths = {}
  for split, recs in all_records(ds).items():
    src = ds.splits[split].source
    for i, r in enumerate(recs):
      assert isinstance(r["image"], bytes)
      img = decode.decode_image(r["image"], 1)
      assert img.ndim == 3 and img.shape[2] == 1
      path = src.paths[i]
      assert ds.class_names[r["label"]] == os.path.relpath(path, messy_folder).split(os.sep)[0]
      with open(path, "rb") as f:
        assert f.read() == r["image"]
      src_paths[os.path.basename(path)] = True
      assert r["label"] == int(ds.splits[split].labels[i])
  assert names <= set(src_paths)
  assert "dog_0001.png" in src_paths  # found one folder deeper (nested)


def test_lazy_reading_from_disk_for_large_folders(messy_folder, monkeypatch):
  monkeypatch.setattr(image_folder, "IN_MEMORY_BYTES", 0)
  ds = load_dataset(make_cfg(messy_folder))
  assert ds.report["in_memory"] is False
  src = ds.splits["train"].source
  assert src.blobs is None
  assert decode.decode_image(src[0]["image"], 3).shape[2] == 3


def test_missing_path_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    image_folder.load(make_cfg(tmp_path / "nope"))


def test_no_class_folders_names_the_loose_files(tmp_path):
  corpus.write_corpus(str(tmp_path / "flat"), corpus.good_items()[:2])
  with pytest.raises(DataError, match=r"no class folders.*rgb\.jpg|no class folders.*grey\.jpg"):
    image_folder.load(make_cfg(tmp_path / "flat"))


def test_empty_class_folder_is_named(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 3, "b": 3})
  os.makedirs(root / "zebra" / "sub")  # folders but no files
  with pytest.raises(DataError, match=r"zebra.*is empty"):
    image_folder.load(make_cfg(root))


def test_class_with_only_broken_files_is_named(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 3, "b": 3})
  corpus.write_corpus(str(root / "broken"), corpus.bad_items())
  with pytest.raises(DataError, match=r"every file of class\(es\) \['broken'\] was skipped"):
    image_folder.load(make_cfg(root))


def test_fewer_than_two_classes(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"only": 4})
  with pytest.raises(DataError, match="at least 2 classes"):
    image_folder.load(make_cfg(root))


def split_membership(ds):
  return {s: sorted(os.path.relpath(p, ds.report["source"]) for p in ds.splits[s].source.paths)
          for s in ds.splits}


def test_splits_are_deterministic_stratified_and_seeded(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 20, "b": 10, "c": 10}, size=(8, 8))
  a, b = image_folder.load(make_cfg(root)), image_folder.load(make_cfg(root))
  assert split_membership(a) == split_membership(b) and a.version == b.version
  per_split = a.report["per_split"]
  assert per_split["val"] == {"a": 4, "b": 2, "c": 2} and per_split["test"] == {"a": 4, "b": 2, "c": 2}
  assert per_split["train"] == {"a": 12, "b": 6, "c": 6}
  other = image_folder.load(make_cfg(root, split_seed=1))
  assert split_membership(other) != split_membership(a) and other.version != a.version
  assert other.report["per_split"] == per_split


def test_exact_duplicates_never_straddle_splits(tmp_path):
  root = tmp_path / "d"
  files = corpus.write_class_folder(str(root), {"a": 12, "b": 12}, size=(8, 8))
  # Five copies of one image under different names and depths, three of another.
  for k in range(4):
    os.makedirs(root / "a" / f"copy{k}", exist_ok=True)
    shutil.copy(files["a"][0], root / "a" / f"copy{k}" / f"x{k}.png")
  for k in range(2):
    shutil.copy(files["b"][3], root / "b" / f"again{k}.bin")
  for seed in range(8):
    ds = image_folder.load(make_cfg(root, split_seed=seed))
    where = {}
    for s in ds.splits:
      for i in range(len(ds.splits[s].source)):
        where.setdefault(ds.splits[s].source[i]["image"], set()).add(s)
    assert all(len(v) == 1 for v in where.values()), seed
    assert ds.report["exact_duplicates"]["groups"] == 2
    assert ds.report["exact_duplicates"]["extra_copies"] == 6


def test_given_train_test_folders_are_kept_and_val_is_carved(tmp_path):
  root = tmp_path / "d"
  train = corpus.write_class_folder(str(root / "train"), {"a": 10, "b": 10}, size=(8, 8))
  test = corpus.write_class_folder(str(root / "test"), {"a": 3, "b": 2}, size=(8, 8), start_seed=500)
  shutil.copy(test["a"][0], root / "train" / "a" / "leaked.png")  # a test image inside train
  ds = image_folder.load(make_cfg(root, val_fraction=0.2))
  assert ds.report["given_splits"] == ["test", "train"]
  got = split_membership(ds)
  assert got["test"] == sorted(os.path.relpath(p, root) for ps in test.values() for p in ps)
  assert len(got["val"]) == 4 and len(got["train"]) == 16
  skipped = ds.report["skipped"]
  assert [os.path.basename(s["path"]) for s in skipped] == ["leaked.png"]
  assert skipped[0]["stage"] == "dedupe" and "test split" in skipped[0]["reason"]
  assert sum(len(v) for v in train.values()) + 1 + 5 == ds.report["num_input"]


def test_version_depends_on_content_labels_and_split_not_paths(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 6, "b": 6}, size=(8, 8))
  v1 = image_folder.load(make_cfg(root)).version
  moved = tmp_path / "elsewhere"
  shutil.copytree(root, moved)
  for i, name in enumerate(sorted(os.listdir(moved / "a"))):
    os.rename(moved / "a" / name, moved / "a" / f"renamed_{i}.png")
  assert image_folder.load(make_cfg(moved)).version == v1
  shutil.move(str(moved / "a" / "renamed_0.png"), moved / "b" / "now_b.png")
  assert image_folder.load(make_cfg(moved)).version != v1


def test_limit_per_split_keeps_a_seeded_mix_of_classes(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 20, "b": 20}, size=(8, 8))
  full = image_folder.load(make_cfg(root))
  ds = image_folder.load(make_cfg(root, limit_per_split=6))
  assert [len(ds.splits[s].labels) for s in ("train", "val", "test")] == [6, 6, 6]
  assert len(set(ds.splits["train"].labels.tolist())) == 2  # not just the first class
  assert ds.version != full.version
  assert image_folder.load(make_cfg(root, limit_per_split=6)).version == ds.version


def test_uniform_size_gives_image_shape(tmp_path):
  root = tmp_path / "d"
  corpus.write_class_folder(str(root), {"a": 4, "b": 4}, size=(12, 10))
  assert image_folder.load(make_cfg(root, channels=1)).image_shape == (12, 10, 1)
  assert np.all(image_folder.load(make_cfg(root)).splits["train"].labels >= 0)
