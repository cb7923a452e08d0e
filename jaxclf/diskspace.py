"""A full disk, said once and plainly: which path, how many bytes were needed, how many are free.

Writers that can run out of space (checkpoints, ingest shards, exports) check the free space
before a large write and translate an ENOSPC met during one into `DiskFullError`, after removing
what they half-wrote, so a rerun after space is freed starts from the last complete state.
"""
from __future__ import annotations

import errno
import os
import shutil


class DiskFullError(OSError):
  """No space for a write; the message names the path and the bytes it needs."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)
    self.message = message

  def __str__(self) -> str:
    return self.message


def free_bytes(path: str) -> int:
  """Free bytes on the filesystem holding `path` (its nearest existing ancestor)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def tree_bytes(path: str) -> int:
  """Bytes of the files under `path` (a file's own size for a file; 0 when absent)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:  # removed while walking (a rotated checkpoint)
        pass
  return total


def message(path: str, needed: int, what: str, then: str = "") -> str:
  free = free_bytes(path)
  return (f"disk full: {what} at {path} needs about {needed} bytes, {free} are free on its "
          f"filesystem{'; ' + then if then else ''}")


def require(path: str, needed: int, what: str, then: str = "") -> None:
  """Raises DiskFullError before a write of about `needed` bytes that cannot fit."""
  if free_bytes(path) < needed:
    raise DiskFullError(message(path, needed, what, then))


def is_enospc(e: BaseException | None) -> bool:
  """ENOSPC anywhere in the exception chain: OSError's errno, or the text other layers
  (TensorStore under Orbax, fsspec) wrap it in."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "No space left on device" in text or "os_error_code='28'" in text:
      return True
    e = e.__cause__ or e.__context__
  return False
