"""Fashion-MNIST (Zalando, MIT licence): 60,000 train + 10,000 test 28x28 greyscale, 10 classes.

Where the files come from, in order:
  1. /usr/share/datasets/fashion-mnist/ (Debian: `apt-get install dataset-fashion-mnist`)
  2. the cache dir (data.cache_dir, else $JAXCLF_CACHE, else ~/.cache/jaxclf/fashion-mnist)
  3. a download from the official URLs into the cache
Every file is checked against the sha256 of its *decompressed* IDX content (Debian re-compressed
the .gz files, so the upstream .gz checksums do not match theirs). The official test set is kept;
validation is carved from train, stratified, from data.split_seed.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request

import numpy as np

from jaxclf.data.types import ArraySource, DataError, Dataset, Split, hash_arrays
from jaxclf.data.splits import carve_validation

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {  # name -> sha256 of the decompressed IDX bytes
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def cache_dir(cfg=None) -> str:
  d = (getattr(cfg, "cache_dir", "") if cfg is not None else "") or os.environ.get("JAXCLF_CACHE")
  return os.path.join(os.path.expanduser(d or "~/.cache/jaxclf"), "fashion-mnist")


# Verified file contents of this process, keyed by (path, size, mtime): gunzipping and hashing the
# 55 MB took about a second on every call, and a test suite or notebook loads the arrays many
# times. A file that changes on disk gets a new key and is verified again.
_VERIFIED: dict[tuple[str, int, int], bytes] = {}


def _read_verified(path: str, name: str) -> bytes | None:
  try:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
      return _VERIFIED[key]
    with open(path, "rb") as f:
      raw = f.read()
    data = gzip.decompress(raw) if path.endswith(".gz") else raw
  except (OSError, EOFError, gzip.BadGzipFile):
    return None
  if hashlib.sha256(data).hexdigest() != FILES[name]:
    return None
  _VERIFIED[key] = data
  return data


def _download(name: str, dest_dir: str, timeout: float = 30) -> bytes | None:
  os.makedirs(dest_dir, exist_ok=True)
  dest = os.path.join(dest_dir, name + ".gz")
  try:
    with urllib.request.urlopen(URL + name + ".gz", timeout=timeout) as r:
      raw = r.read()
  except OSError:
    return None
  data = gzip.decompress(raw)
  if hashlib.sha256(data).hexdigest() != FILES[name]:
    return None
  tmp = f"{dest}.{os.getpid()}.tmp"  # per process: parallel downloaders must not share one
  with open(tmp, "wb") as f:
    f.write(raw)
  os.replace(tmp, dest)
  return data


def find_files(cfg=None, allow_download: bool = True) -> dict[str, bytes]:
  dirs = [SYSTEM_DIR, cache_dir(cfg)]
  out: dict[str, bytes] = {}
  for name in FILES:
    for d in dirs:
      for candidate in (os.path.join(d, name + ".gz"), os.path.join(d, name)):
        if os.path.exists(candidate) and (data := _read_verified(candidate, name)) is not None:
          out[name] = data
          break
      if name in out:
        break
    if name not in out and allow_download:
      data = _download(name, cache_dir(cfg))
      if data is not None:
        out[name] = data
    if name not in out:
      raise DataError(
          f"Fashion-MNIST file {name} not found or failed its sha256 check in {dirs}, and the "
          f"download from {URL} failed. Fix: `apt-get install dataset-fashion-mnist` (Debian/"
          f"Ubuntu), or put the four official .gz files in {cache_dir(cfg)}.")
  return out


def _parse_idx(data: bytes) -> np.ndarray:
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_arrays(cfg=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  f = find_files(cfg)
  return {
      "train": (_parse_idx(f["train-images-idx3-ubyte"])[..., None],
                _parse_idx(f["train-labels-idx1-ubyte"]).astype(np.int32)),
      "test": (_parse_idx(f["t10k-images-idx3-ubyte"])[..., None],
               _parse_idx(f["t10k-labels-idx1-ubyte"]).astype(np.int32)),
  }


def load(cfg) -> Dataset:
  arrays = load_arrays(cfg)
  x, y = arrays["train"]
  tr_idx, va_idx = carve_validation(y, float(cfg.val_fraction), int(cfg.split_seed))
  limit = int(getattr(cfg, "limit_per_split", 0) or 0)

  def make(images, labels, idx=None):
    if idx is not None:
      images, labels = images[idx], labels[idx]
    if limit:
      images, labels = images[:limit], labels[:limit]
    return Split(ArraySource(np.ascontiguousarray(images), labels), labels)

  splits = {"train": make(x, y, tr_idx), "val": make(x, y, va_idx),
            "test": make(*arrays["test"])}
  version = hash_arrays(*FILES.values(), "fashion_mnist", str(float(cfg.val_fraction)),
                        str(int(cfg.split_seed)), str(limit))[:16]
  return Dataset("fashion_mnist", CLASS_NAMES, splits, version, encoded=False,
                 image_shape=(28, 28, 1),
                 report={"source": "fashion_mnist", "license": "MIT", "skipped": [],
                         "limit_per_split": limit})
