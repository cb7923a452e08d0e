"""A content hash of the rows a trainer was handed, the same on both sides of bench/race.py.

rows_sha256(images, labels): sha256 of the sorted per-row digests, each sha256(label as int64 ||
the image's bytes as uint8). It names the set of (image, label) rows, whatever order they are
held in, and changes with any image, label, or row added or dropped. numpy only: the PyTorch
anchor imports it without jax.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def _row_digest(image, label) -> bytes:
  h = hashlib.sha256(np.int64(label).tobytes())
  h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
  return h.digest()


def rows_sha256(images: np.ndarray, labels: np.ndarray) -> str:
  images = np.asarray(images)
  if images.dtype != np.uint8:  # another dtype is other rows, not a cast of these
    raise ValueError(f"images are {images.dtype}, expected uint8")
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return digest_of(_row_digest(x, y) for x, y in zip(images, labels))


def digest_of(row_digests: Iterable[bytes]) -> str:
  return hashlib.sha256(b"".join(sorted(row_digests))).hexdigest()
