"""Class-per-folder images: `root/<class>/<files at any depth>`, or with given splits
`root/{train,val,test}/<class>/...` (`train/` + `test/` alone is fine: val is carved from train).

Classes are the sorted folder names. Every regular file is a candidate whatever its extension
(formats are detected from content); dot-files (.DS_Store, ._AppleDouble) are ignored and listed.
Each file is fully decoded once in a thread pool; failures are reported skips. Records are
`{"image": encoded bytes, "label": int}`: held in memory for small folders, read from disk on
access for large ones.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from jaxclf.data import decode
from jaxclf.data.types import DataError, Dataset, Split
from jaxclf.data.sources import plan as plan_lib
from jaxclf.data.sources import scan

# Folders up to this many bytes of image files are kept in memory (no file reads while training).
IN_MEMORY_BYTES = 256 * 1024 * 1024
SPLIT_DIR_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class FileSource:
  """Grain random-access source over image files: [i] -> {'image': bytes, 'label': int}.

  `blobs` (the bytes, when small enough to keep) avoid disk reads; otherwise each access reads
  one file, so memory stays flat however large the folder is. Picklable for Grain workers.
  """

  def __init__(self, paths: list[str], labels: np.ndarray, blobs: list[bytes] | None = None):
    self.paths = paths
    self.labels = labels
    self.blobs = blobs

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if self.blobs is not None:
      data = self.blobs[index]
    else:
      with open(self.paths[index], "rb") as f:
        data = f.read()
    return {"image": data, "label": int(self.labels[index])}

  def __repr__(self) -> str:  # Grain logs repr(source); keep it short
    return f"FileSource(n={len(self)}, in_memory={self.blobs is not None})"


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and _visible(e.name))


def find_given_splits(root: str) -> dict[str, str] | None:
  """{split: dir} when root's top-level folders are split folders (train/ plus val/ and/or
  test/), else None. A dataset whose classes happen to be called 'train'/'test' with nothing
  else is ambiguous; split folders win, because that layout is far more common."""
  tops = _subdirs(root)
  if not tops or any(t.lower() not in SPLIT_DIR_NAMES for t in tops):
    return None
  found = {SPLIT_DIR_NAMES[t.lower()]: os.path.join(root, t) for t in tops}
  if "train" not in found or len(found) < 2:
    return None
  return found


def list_class_files(class_dir: str) -> tuple[list[str], list[str]]:
  """All regular files under class_dir at any depth, sorted (deterministic order), plus the
  hidden ones that were ignored. Symlinked directories are not followed (no cycles)."""
  files, hidden = [], []
  for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if not _visible(name):
        hidden.append(path)
      elif os.path.isfile(path):  # regular file, or a symlink to one
        files.append(path)
  return files, hidden


def list_candidates(root: str) -> tuple[list[plan_lib.Candidate], dict]:
  """root -> candidates (uri = path, label = class folder, split if given) + what was ignored.
  Raises DataError for a missing root, no class folders, or an empty class folder."""
  if not os.path.exists(root):
    raise DataError(f"data.source: {root!r} does not exist")
  if not os.path.isdir(root):
    raise DataError(f"data.source: {root!r} is not a directory")
  given = find_given_splits(root)
  split_dirs = given or {None: root}
  candidates: list[plan_lib.Candidate] = []
  ignored: list[str] = []
  for split, sdir in split_dirs.items():
    classes = _subdirs(sdir)
    top_files = sorted(e.path for e in os.scandir(sdir) if e.is_file())
    if not classes:
      raise DataError(
          f"{sdir}: no class folders. Expected {sdir}/<class name>/<image files>"
          + (f"; found {len(top_files)} loose file(s) such as {os.path.basename(top_files[0])!r}"
             if top_files else ""))
    ignored += top_files
    for cls in classes:
      files, hidden = list_class_files(os.path.join(sdir, cls))
      ignored += hidden
      if not files:
        raise DataError(f"class folder {os.path.join(sdir, cls)!r} is empty (no image files); add "
                        "images or remove the folder")
      candidates += [plan_lib.Candidate(uri=p, label_name=cls, split=split,
                                        read=functools.partial(scan.read_local, p)) for p in files]
  return candidates, {"given_splits": sorted(s for s in split_dirs if s), "ignored": ignored}


def _limit(idx: list[int], limit: int, seed: int) -> list[int]:
  """A seeded subset (not the first N: records are ordered by class)."""
  if not limit or len(idx) <= limit:
    return idx
  rng = np.random.default_rng(seed)
  return sorted(np.asarray(idx)[rng.permutation(len(idx))[:limit]].tolist())


def _cfg(cfg, name, default):
  value = getattr(cfg, name, default) if cfg is not None else default
  return default if value is None else value


def load(cfg) -> Dataset:
  root = os.path.expanduser(str(cfg.source))
  channels = int(_cfg(cfg, "channels", 3))
  max_pixels = int(_cfg(cfg, "max_pixels", decode.DEFAULT_MAX_PIXELS) or decode.DEFAULT_MAX_PIXELS)
  seed = int(_cfg(cfg, "split_seed", 0))
  candidates, listing = list_candidates(root)
  plan = plan_lib.make_plan(candidates, source=root, channels=channels, max_pixels=max_pixels,
                            val_fraction=float(_cfg(cfg, "val_fraction", 0.1)),
                            test_fraction=float(_cfg(cfg, "test_fraction", 0.1)), seed=seed)
  limit = int(_cfg(cfg, "limit_per_split", 0) or 0)
  total_bytes = sum(e.checked.size for e in plan.entries)
  in_memory = total_bytes <= IN_MEMORY_BYTES

  splits = {}
  kept: list[plan_lib.Entry] = []
  for s in plan_lib.SPLITS:
    entries = plan.split_entries(s)
    entries = [entries[i] for i in _limit(list(range(len(entries))), limit, seed)]
    kept += entries
    paths = [e.candidate.uri for e in entries]
    labels = np.asarray([e.label for e in entries], np.int32)
    blobs = None
    if in_memory:
      blobs = []
      for e in entries:
        data, err = scan.read_local(e.candidate.uri)
        if data is None:
          raise DataError(f"{e.candidate.uri}: vanished while loading ({err})")
        blobs.append(data)
    splits[s] = Split(FileSource(paths, labels, blobs), labels)

  version = plan.version if not limit else scan.content_version(
      plan.class_names, [(e.checked.sha256, e.label, e.split) for e in kept])
  shapes = {(e.checked.height, e.checked.width) for e in kept}
  image_shape = (*shapes.pop(), channels) if len(shapes) == 1 else None
  report = {**plan.report, **listing, "in_memory": in_memory, "limit_per_split": limit}
  return Dataset(name=os.path.basename(os.path.normpath(root)) or root,
                 class_names=plan.class_names, splits=splits, version=version, encoded=True,
                 image_shape=image_shape, report=report)
