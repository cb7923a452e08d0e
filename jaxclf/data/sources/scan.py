"""Shared by every source: decode-check a batch of files in a thread pool, hash their content,
and compute the content-addressed dataset version.

A check reads the bytes, hashes them (sha256: exact-duplicate groups, versioning), reads the
header (`decode.probe`) and then decodes the whole image (`decode.decode_image`), because only a
full decode notices a truncated file. The decoded pixels also give a perceptual hash (dHash) for
near-duplicate reports. Failures come back as skips, never as exceptions.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from jaxclf.data import decode

# Near-duplicate threshold: dHash Hamming distance (of 64 bits) at or below which two images are
# reported as near-duplicates. 0-4 catches re-encodes and small resizes without false alarms on
# different photos of the same kind.
NEAR_DUPLICATE_BITS = 4


@dataclasses.dataclass
class Checked:
  """One input file after its check: either `info` fields are set or `skip` is."""
  uri: str  # what the user would recognise: a path, s3:// or https:// URL, archive member
  size: int = 0
  sha256: str = ""
  format: str = ""
  width: int = 0  # after EXIF orientation
  height: int = 0
  mode: str = ""
  dhash: str = ""
  skip: dict | None = None  # {"path", "stage", "reason"}

  @property
  def ok(self) -> bool:
    return self.skip is None


def dhash(img: np.ndarray) -> str:
  """64-bit difference hash of a uint8 HWC image as 16 hex chars (stable across re-encodes)."""
  grey = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).convert("L")
  small = np.asarray(grey.resize((9, 8), Image.Resampling.BILINEAR), np.int16)
  bits = (small[:, 1:] > small[:, :-1]).flatten()
  return int("".join("1" if b else "0" for b in bits), 2).to_bytes(8, "big").hex()


def check_bytes(data: bytes | None, uri: str, *, channels: int = 3,
                max_pixels: int = decode.DEFAULT_MAX_PIXELS, read_error: str | None = None) -> Checked:
  """Bytes (or the error that stopped reading them) -> Checked. Never raises for bad data."""
  if data is None:
    return Checked(uri, skip={"path": uri, "stage": "read", "reason": read_error or "unreadable"})
  out = Checked(uri, size=len(data), sha256=hashlib.sha256(data).hexdigest())
  try:
    info = decode.probe(data, source=uri) if data else None
    arr = decode.decode_image(data, channels, max_pixels=max_pixels, source=uri)
  except decode.DecodeError as e:
    out.skip = {"path": uri, "stage": e.stage, "reason": e.reason}
    return out
  except Exception as e:  # noqa: BLE001 - a codec bug on one file must not end the run
    out.skip = {"path": uri, "stage": "decode", "reason": f"unexpected {type(e).__name__}: {e}"}
    return out
  out.format, out.mode = info.format, info.mode
  out.height, out.width = int(arr.shape[0]), int(arr.shape[1])
  out.dhash = dhash(arr)
  return out


def read_local(path: str) -> tuple[bytes | None, str | None]:
  try:
    with open(path, "rb") as f:
      return f.read(), None
  except OSError as e:
    return None, f"cannot read file ({type(e).__name__}: {e.strerror or e})"


def check_files(items: Sequence[tuple[str, Callable[[], tuple[bytes | None, str | None]]]], *,
                channels: int, max_pixels: int, workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[Checked]:
  """[(uri, reader)] -> [Checked] in input order; readers run in a thread pool (Pillow releases
  the GIL while decoding, so threads scale without process start-up or pickling)."""
  workers = workers or min(4, (os.cpu_count() or 2) * 2)

  def one(item):
    uri, reader = item
    data, err = reader()
    return check_bytes(data, uri, channels=channels, max_pixels=max_pixels, read_error=err)

  results: list[Checked] = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for i, r in enumerate(pool.map(one, items)):
      results.append(r)
      if progress:
        progress(i + 1, len(items))
  return results


def content_version(class_names: Sequence[str], records: Iterable[tuple[str, int, str]]) -> str:
  """The dataset version: sha256 over class names and the sorted (sha256, label, split) triples.

  Independent of paths, file order and how the data arrived (folder, archive, S3, ingested
  shards), so the same pictures with the same labels and split give the same version anywhere.
  """
  h = hashlib.sha256()
  h.update(("\x1f".join(class_names) + "\x1e").encode())
  for sha, label, split in sorted(records):
    h.update(f"{sha}:{int(label)}:{split}\n".encode())
  return h.hexdigest()[:16]


MAX_BUCKET = 2000  # a band bucket bigger than this is blank or flat images: not compared


def band_masks(max_bits: int = NEAR_DUPLICATE_BITS) -> list[int]:
  """Masks of the max_bits+1 bands the 64 dHash bits are cut into."""
  bands = max_bits + 1
  width = 64 // bands
  return [((1 << (width if b < bands - 1 else 64 - b * width)) - 1) << (b * width)
          for b in range(bands)]


def bucket_pairs(members: Sequence[tuple[int, int]], max_bits: int = NEAR_DUPLICATE_BITS):
  """Members (id, dHash value) of one band bucket, sorted by id -> (i, j, distance), i < j."""
  if len(members) < 2 or len(members) > MAX_BUCKET:
    return
  for a in range(len(members)):
    i, vi = members[a]
    for c in range(a + 1, len(members)):
      j, vj = members[c]
      d = (vi ^ vj).bit_count()
      if d <= max_bits:
        yield i, j, d


def find_near_duplicates(hashes: Sequence[str], max_bits: int = NEAR_DUPLICATE_BITS
                         ) -> list[tuple[int, int, int]]:
  """Pairs (i, j, distance) of items whose dHash differ in <= max_bits bits (i < j).

  Pigeonhole: split the 64 bits into max_bits+1 bands; two hashes within max_bits bits agree
  exactly on at least one band, so only items sharing a band value are compared. (The Beam
  ingest runs the same buckets as a GroupByKey on (band, value).)
  """
  values = [int(h, 16) if h else None for h in hashes]
  pairs: dict[tuple[int, int], int] = {}
  for mask in band_masks(max_bits):
    buckets: dict[int, list[tuple[int, int]]] = {}
    for i, v in enumerate(values):
      if v is not None:
        buckets.setdefault(v & mask, []).append((i, v))
    for members in buckets.values():
      for i, j, d in bucket_pairs(members, max_bits):
        pairs[(i, j)] = d
  return sorted((i, j, d) for (i, j), d in pairs.items())
