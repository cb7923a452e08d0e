"""The types every data module shares: a dataset, its splits, their record sources, and the
error for bad data.

A `Dataset` holds one random-access `SplitSource` per split. A record is
`{"image": uint8 HWC array | encoded bytes, "label": int}`; encoded bytes are decoded by the
pipeline with `jaxclf.data.decode`, so small in-memory datasets (Fashion-MNIST) skip decoding
and large ones stream from disk.

The sources (`jaxclf.data.sources.*`) build these; `jaxclf.data.dataset` chooses a source for a
config and sits above both, so no source imports the dispatch that imports it.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Protocol

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
