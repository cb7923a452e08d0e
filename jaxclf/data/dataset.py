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
