"""Verified model loading: read the file once, hash those bytes, compare, hand the same bytes on.

Every path that gives a model to onnxruntime (the gateway, `jaxclf evaluate`, the Triton python
models) calls `read_verified` and passes the returned bytes to `InferenceSession(bytes)`, so what
runs is exactly what was hashed: nothing can swap the file between the check and the load.

The recorded sha256 comes from the directory the model sits in, first found of:
  integrity.json   {"model.onnx": "<sha256>"}            (Triton version directories)
  version.json     {"artifacts": {f: {"sha256": ...}}}    (a registry version)
  export.json      {"artifacts": {f: "<sha256>"}}         (an export directory)
A file with no recorded hash is refused unless `allow_unverified` (CLI: --allow-unverified).

stdlib only: Triton's python models import it from the serving image.
"""
from __future__ import annotations

import hashlib
import json
import os

INTEGRITY_FILE = "integrity.json"
RECORD_FILES = (INTEGRITY_FILE, "version.json", "export.json")


class IntegrityError(ValueError):
  """A model file does not match its recorded sha256, or has none; the message names the file."""


def recorded_sha256(directory: str, filename: str) -> tuple[str | None, str | None]:
  """(sha256, the record file it came from) for `filename` in `directory`, or (None, None)."""
  for record in RECORD_FILES:
    path = os.path.join(directory, record)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise IntegrityError(f"{path}: cannot read the recorded hashes ({e})") from None
    entry = meta.get(filename) if record == INTEGRITY_FILE else (meta.get("artifacts") or {}).get(filename)
    if isinstance(entry, dict):
      entry = entry.get("sha256")
    if entry:
      return str(entry), path
  return None, None


def read_verified(path: str, *, allow_unverified: bool = False) -> tuple[bytes, str]:
  """The bytes of `path` and their sha256, after checking them against the recorded hash."""
  directory, filename = os.path.split(os.path.abspath(path))
  with open(path, "rb") as f:
    data = f.read()
  got = hashlib.sha256(data).hexdigest()
  want, record = recorded_sha256(directory, filename)
  if want is None:
    if not allow_unverified:
      raise IntegrityError(f"{path}: no recorded sha256 ({' / '.join(RECORD_FILES)} beside it "
                           "list none); refusing to load an unverified model (pass "
                           "--allow-unverified to load it anyway)")
  elif got != want:
    raise IntegrityError(f"{path}: sha256 {got[:16]}… does not match {want[:16]}… recorded in "
                         f"{record}; the file was modified or half-copied, refusing to load")
  return data, got
