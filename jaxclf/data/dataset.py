"""The in-process view of a dataset that the trainer, evaluator and ingest agree on.

A `Dataset` holds one random-access `SplitSource` per split. A record is
`{"image": uint8 HWC array | encoded bytes, "label": int}`; encoded bytes are decoded by the
pipeline with `jaxclf.data.decode`, so small in-memory datasets (Fashion-MNIST) skip decoding
and large ones stream from disk.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from typing import Any, Protocol, Sequence

import numpy as np


class SplitSource(Protocol):
  """A Grain `RandomAccessDataSource`: len() and [i] -> {'image', 'label'}."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass
class ArraySource:
  """Images held in memory as one uint8 NHWC array (Fashion-MNIST, small folders)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:  # Grain logs repr(source); keep it short
    return f"ArraySource(n={len(self)}, shape={self.images.shape[1:]})"


@dataclasses.dataclass
class Split:
  source: SplitSource
  labels: np.ndarray  # all labels, in record order: stratification, class weights, reports


@dataclasses.dataclass
class Dataset:
  name: str
  class_names: list[str]
  splits: dict[str, Split]
  version: str  # content hash of records + labels + split assignment
  # Whether records carry encoded bytes (decode in the pipeline) or uint8 arrays.
  encoded: bool = False
  # Native (H, W, C) if all images share it, else None. Used to check the model input fits.
  image_shape: tuple[int, int, int] | None = None
  report: dict[str, Any] = dataclasses.field(default_factory=dict)  # skipped files, counts, ...

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def split(self, name: str) -> Split:
    if name not in self.splits:
      raise KeyError(f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
    return self.splits[name]

  def summary(self) -> dict[str, Any]:
    return {
        "name": self.name,
        "version": self.version,
        "num_classes": self.num_classes,
        "class_names": self.class_names,
        "image_shape": list(self.image_shape) if self.image_shape else None,
        "splits": {k: {"count": int(len(v.labels)),
                       "per_class": np.bincount(v.labels, minlength=self.num_classes).tolist()}
                   for k, v in self.splits.items()},
        "skipped": len(self.report.get("skipped", [])),
    }


def hash_arrays(*arrays: np.ndarray | bytes | str) -> str:
  h = hashlib.sha256()
  for a in arrays:
    if isinstance(a, str):
      a = a.encode()
    if isinstance(a, np.ndarray):
      h.update(str((a.dtype.str, a.shape)).encode())
      a = np.ascontiguousarray(a).tobytes()
    h.update(hashlib.sha256(a).digest())
  return h.hexdigest()


class DataError(ValueError):
  """A problem with the data a run was pointed at, named precisely, raised before any compute."""


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
