"""Which dataset a run config names, and what runs do with one: load it (`load_dataset`, the
dispatch over `jaxclf.data.sources`), subset its train split, write its report, weight classes.

The types themselves (`Dataset`, `Split`, `ArraySource`, `DataError`) live in
`jaxclf.data.types`, which the sources import; this module sits above the sources.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from jaxclf.data.types import ArraySource, DataError, Dataset, Split, hash_arrays


def load_dataset(cfg) -> Dataset:
  """The dataset `cfg.source` names (`_load_source`), with `cfg.limit_per_class` applied to its
  train split (`limit_per_class`)."""
  dataset = _load_source(cfg)
  n = int(getattr(cfg, "limit_per_class", 0) or 0)
  return limit_per_class(dataset, n, int(getattr(cfg, "split_seed", 0))) if n else dataset


@dataclasses.dataclass
class SubsetSource:
  """Records `indices` of another source (a stratified subset of a streamed split)."""
  source: Any
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]

  def __repr__(self) -> str:
    return f"SubsetSource(n={len(self)} of {self.source!r})"


def stratified_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int,
                       class_names: Sequence[str] = ()) -> np.ndarray:
  """`per_class` record indices of every class, drawn with `seed`, in record order. Nested: the
  first N of each class's seeded permutation, so a smaller N is a subset of a larger one. A class
  with fewer records is a DataError naming it (a silently smaller class would skew the curve)."""
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  short = [f"{class_names[c] if c < len(class_names) else c} ({counts[c]})"
           for c in range(num_classes) if counts[c] < per_class]
  if short:
    raise DataError(f"data.limit_per_class={per_class}: the train split has fewer images of "
                    f"{len(short)} class(es): {', '.join(short)}; lower the limit")
  rng = np.random.default_rng(seed)
  picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
  return np.sort(np.concatenate(picked))


def limit_per_class(dataset: Dataset, per_class: int, seed: int) -> Dataset:
  """`dataset` whose train split keeps `per_class` images of every class (stratified, seeded by
  data.split_seed); val and test are untouched, so the subset is disjoint from both."""
  train = dataset.split("train")
  idx = stratified_indices(train.labels, dataset.num_classes, per_class, seed,
                           dataset.class_names)
  src = train.source
  source = ArraySource(np.ascontiguousarray(src.images[idx]), np.asarray(src.labels)[idx]) \
      if isinstance(src, ArraySource) else SubsetSource(src, idx)
  splits = {**dataset.splits, "train": Split(source, np.asarray(train.labels)[idx])}
  version = hash_arrays(dataset.version, f"limit_per_class={per_class}", str(seed))[:16]
  report = {**dataset.report, "limit_per_class": {"per_class": per_class, "seed": seed,
                                                  "train_images": int(len(idx))}}
  return dataclasses.replace(dataset, splits=splits, version=version, report=report)


def _load_source(cfg) -> Dataset:
  """`cfg` is the `data` section of the run config. Dispatches on `cfg.source`:

  - 'fashion_mnist'                         built-in (apt package, cache, or verified download)
  - a directory holding manifest.json       an ingested ArrayRecord dataset (`jaxclf data ingest`)
  - any other directory                     class-per-folder images (`ImageFolder`)
  """
  source = str(cfg.source)
  if source == "fashion_mnist":
    from jaxclf.data.sources import fashion_mnist
    return fashion_mnist.load(cfg)
  if "://" in source:
    from jaxclf.data.sources import ingested
    return ingested.load(cfg)
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    known = ["fashion_mnist"]
    close = difflib.get_close_matches(source, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(f"data.source: {source!r} does not exist.{hint} Give 'fashion_mnist', a "
                    "class-per-folder directory, or a dataset written by `jaxclf data ingest`.")
  if os.path.isfile(os.path.join(path, "manifest.json")):
    from jaxclf.data.sources import ingested
    return ingested.load(cfg)
  if os.path.isdir(path):
    from jaxclf.data.sources import image_folder
    return image_folder.load(cfg)
  raise DataError(f"data.source: {source!r} is a file; give a directory or 'fashion_mnist'")


# Below this many images a split is too small to choose an epoch or fit a temperature on: one
# image moves accuracy by 1/n (5 points at n=20), and the standard error of an accuracy p over n
# images is sqrt(p(1-p)/n), 6.7 points at p=0.9 and n=20 against 3 at n=100.
MIN_EVAL_IMAGES = 100
_EVAL_USES = {"val": "Checkpoint selection and the calibration temperature rest on it",
              "test": "The reported test accuracy and ECE rest on it"}


def small_split_warnings(counts: dict[str, int], fix: str) -> list[str]:
  """A warning for each evaluation split (val, test) with fewer than MIN_EVAL_IMAGES images:
  what rests on it, how coarse it is, and `fix`, what to do. An empty split gets none (an
  empty val split is an error of its own; a dataset may have no test split)."""
  out = []
  for split, use in _EVAL_USES.items():
    n = int(counts.get(split, 0))
    if 0 < n < MIN_EVAL_IMAGES:
      se = 100 * math.sqrt(0.9 * 0.1 / n)
      out.append(f"small {split} split: {n} images. {use}, and at n={n} one "
                 f"image is {100 / n:.1f} accuracy points (standard error ±{se:.1f} points at 90% "
                 f"accuracy): below {MIN_EVAL_IMAGES} images, two results a few points apart cannot "
                 f"be told apart. {fix}")
  return out


def split_size_warnings(dataset: Dataset) -> list[str]:
  """`small_split_warnings` for a loaded dataset, with the fix that fits where its splits
  come from."""
  counts = {name: len(split.labels) for name, split in dataset.splits.items()}
  report, limit = dataset.report, int(dataset.report.get("limit_per_split") or 0)
  if 0 < limit < MIN_EVAL_IMAGES:
    fix = f"data.limit_per_split={limit} caps each split: raise it or set 0."
  elif report.get("ingested_version"):
    fix = ("Its splits were set at ingest: ingest again with a larger --val-fraction / "
           "--test-fraction (and --force), or add images.")
  elif report.get("given_splits"):
    fix = "The source's own val/ and test/ folders set them: add images there."
  else:
    fix = (f"Hold out at least {MIN_EVAL_IMAGES}: raise data.val_fraction / "
           "data.test_fraction, or add images.")
  return small_split_warnings(counts, fix)


def write_report(dataset: Dataset, path: str) -> None:
  """The run's data report: summary plus every skipped file with its reason."""
  with open(path, "w") as f:
    json.dump({**dataset.summary(), **dataset.report}, f, indent=2, default=str)


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
  """'none' -> ones; 'balanced' -> n / (k * count_c), as scikit-learn's 'balanced'."""
  if mode == "none":
    return np.ones(num_classes, np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  w = len(labels) / (num_classes * np.maximum(counts, 1))
  return w.astype(np.float32)


def check_classes(found: Sequence[str], expected: Sequence[str], what: str) -> None:
  unknown = sorted(set(found) - set(expected))
  if unknown:
    raise DataError(f"{what}: classes unknown to the model: {unknown}; the model knows {list(expected)}")
