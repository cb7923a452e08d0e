"""The held-out data `jaxclf evaluate` scores, and its labels in the model's classes.

  'fashion_mnist'            its test split
  an ingested dataset        its test split (opened with the model's run's data config when there
                             is one: the same split seed and fractions as training)
  a class-per-folder folder  every image is test data (with train/ val/ test/ split folders,
                             only test/)

Images are not decoded here: `TestData.read` returns uint8 pixels or encoded bytes, and
jaxclf.evaluate.scoring decodes them as training and serving do. Class names are matched to the
model's exactly, or up to case and separators when that is unambiguous.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from jaxclf.data.dataset import DataError, check_classes
from jaxclf.evaluate.model_loader import LoadedModel


@dataclasses.dataclass
class TestData:
  source: str
  kind: str  # fashion_mnist | ingested | image_folder
  name: str
  version: str | None
  split: str
  class_names: list[str]
  labels: np.ndarray  # indices into class_names (the data's own classes)
  read: Callable[[int], Any]  # i -> uint8 HWC array or encoded bytes
  describe: Callable[[int], str]  # i -> a file path or 'name:test[i]'
  skipped: list[dict] = dataclasses.field(default_factory=list)
  # Position of each example in the full test set (differs from 0..N-1 after --max-examples).
  origin: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)

  def original_index(self, i: int) -> int:
    return int(self.origin[i]) if self.origin is not None else int(i)


def _data_config(test_data: str, base=None):
  """The data section used to open a dataset: the run's own (same split seed and fractions as
  training, so 'test' is the same test split) when there is one, else the defaults."""
  if base is None:
    from jaxclf.config.defaults import default_config
    base = default_config().data
  cfg = copy.deepcopy(base)
  with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
    cfg.source = test_data
    cfg.limit_per_split = 0  # the whole test split, whatever the run trained on
  return cfg


def _load_dataset_split(test_data: str, kind: str, data_cfg) -> TestData:
  from jaxclf.data.dataset import load_dataset
  ds = load_dataset(_data_config(test_data, data_cfg))
  if "test" not in ds.splits or not len(ds.split("test").labels):
    raise DataError(f"--test-data {test_data!r}: dataset {ds.name!r} has no test split "
                    f"(splits: {sorted(ds.splits)})")
  split = ds.split("test")
  src = split.source
  name = ds.name
  return TestData(test_data, kind, name, ds.version, "test", list(ds.class_names),
                  np.asarray(split.labels, np.int64), lambda i: src[int(i)]["image"],
                  lambda i: f"{name}:test[{int(i)}]")


def _load_folder(root: str, workers: int) -> TestData:
  from jaxclf.data.sources import image_folder, scan
  candidates, listing = image_folder.list_candidates(root)
  if listing.get("given_splits"):
    candidates = [c for c in candidates if c.split == "test"]
    split = "test"
    if not candidates:
      raise DataError(f"--test-data {root!r}: has split folders {listing['given_splits']} but no "
                      "test/ folder; point --test-data at the folder of test images")
  else:
    split = "all"
  if not candidates:
    raise DataError(f"--test-data {root!r}: no image files found")
  class_names = sorted({c.label_name for c in candidates})
  index = {n: i for i, n in enumerate(class_names)}
  paths = [c.uri for c in candidates]
  labels = np.array([index[c.label_name] for c in candidates], np.int64)

  # One pass of hashing fixes a content version for the report; decoding happens later.
  def sha(p):
    data, _ = scan.read_local(p)
    return hashlib.sha256(data).hexdigest() if data is not None else "unreadable"

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    shas = list(pool.map(sha, paths))
  version = scan.content_version(class_names, [(s, int(l), split) for s, l in zip(shas, labels)])

  def read(i):
    with open(paths[int(i)], "rb") as f:
      return f.read()

  return TestData(root, "image_folder", os.path.basename(os.path.normpath(root)) or root,
                  version, split, class_names, labels, read, lambda i: paths[int(i)])


def load_test_data(test_data: str, data_cfg=None, workers: int = 2) -> TestData:
  source = str(test_data)
  if source == "fashion_mnist":
    return _load_dataset_split(source, "fashion_mnist", data_cfg)
  if "://" in source and not source.startswith("file://"):
    return _load_dataset_split(source, "ingested", data_cfg)
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise DataError(f"--test-data {source!r} does not exist; give 'fashion_mnist', an ingested "
                    "dataset directory, or a class-per-folder directory of images")
  if not os.path.isdir(path):
    raise DataError(f"--test-data {source!r} is a file; give a directory or 'fashion_mnist'")
  if os.path.isfile(os.path.join(path, "manifest.json")):
    return _load_dataset_split(path, "ingested", data_cfg)
  if not any(not n.startswith(".") for n in os.listdir(path)):
    raise DataError(f"--test-data {source!r} is an empty folder; expected "
                    f"{source}/<class name>/<image files>")
  return _load_folder(path, workers)


def _name_key(name: str) -> str:
  # Folder names cannot hold '/', so 'T-shirt/top' arrives as 'T-shirt_top' or 't-shirt top'.
  return re.sub(r"[\s/\\_:-]+", "_", name.casefold()).strip("_")


def match_class_names(found: Sequence[str], model_classes: Sequence[str], source: str
                      ) -> dict[str, str]:
  """Test class name -> model class name. Exact names first; then names equal up to case and
  separators (space, '/', '_', '-', ':'), when that is unambiguous. Anything left is an error
  that lists the unknown classes and the ones the model knows."""
  exact = set(model_classes)
  by_key: dict[str, list[str]] = {}
  for m in model_classes:
    by_key.setdefault(_name_key(m), []).append(m)
  mapping, unknown = {}, []
  for name in found:
    if name in exact:
      mapping[name] = name
    elif len(by_key.get(_name_key(name), [])) == 1:
      mapping[name] = by_key[_name_key(name)][0]
    else:
      unknown.append(name)
  if unknown:
    check_classes(unknown, model_classes, f"--test-data {source!r}")  # raises, listing them
  return mapping


def model_labels(data: TestData, model: LoadedModel) -> tuple[np.ndarray, dict[str, str]]:
  """The data's labels as model class indices, and the names that were matched loosely."""
  mapping = match_class_names(data.class_names, model.class_names, data.source)
  to_model = np.array([model.class_names.index(mapping[n]) for n in data.class_names], np.int64)
  renamed = {k: v for k, v in mapping.items() if k != v}
  return to_model[data.labels], renamed
