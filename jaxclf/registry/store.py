"""Where registry files live: a local directory by default, any fsspec URL (s3://bucket/prefix)
for teams. The registry needs three primitives beyond read/write, and each says what it guarantees:

- `create_exclusive(path, data)`: creates `path` with `data` only if it does not exist yet, and
  reports whether it won. Locally that is a hard link of a fully written temporary file
  (`os.link` fails atomically when the name exists), so a reader never sees a half-written file and
  two writers never both win. On object stores it is `open(path, "xb")` where the filesystem
  implements exclusive create: s3fs sends `If-None-Match: *` and S3 answers 412 to the loser
  (tested against moto's S3 server with concurrent processes). Elsewhere it falls back to
  check-then-write, which is NOT race-free, and says so with a warning once.
- `write_atomic(path, data)`: readers see the old or the new content, never a mix (local: temp +
  rename; object stores: a single PUT is atomic already).
- `put_file` / `get_file`: whole files.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Iterable

import fsspec



def _durable_temp(path: str, data: bytes) -> str:
  """Writes `data`, fsynced, to a temp file beside `path`; the caller renames or links it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    _unlink(tmp)
    raise
  return tmp

class StoreError(RuntimeError):
  pass


class Store:
  def __init__(self, root: str):
    self.url = str(root)
    if fsspec.core.split_protocol(self.url)[0] in ("s3", "s3a"):
      # The same s3fs configuration as the data side: bounded botocore retries (AWS_MAX_ATTEMPTS).
      from jaxclf.data.sources import remote  # noqa: PLC0415 - only for s3:// roots
      self.fs = remote.s3_filesystem()
      self.root = self.fs._strip_protocol(self.url)
    else:
      self.fs, self.root = fsspec.core.url_to_fs(self.url)
    self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                            else (self.fs.protocol,))
    if self.local:
      self.root = os.path.abspath(self.root)
    self._warned = False

  def path(self, *parts: str | int) -> str:
    return "/".join([self.root.rstrip("/"), *(str(p).strip("/") for p in parts)])

  def exists(self, path: str) -> bool:
    return self.fs.exists(path)

  def isdir(self, path: str) -> bool:
    return self.fs.isdir(path)

  def listdir(self, path: str) -> list[str]:
    """Base names of the entries under `path` ([] when it does not exist)."""
    if self.local:
      try:
        return sorted(os.listdir(path))
      except FileNotFoundError:
        return []
    try:
      # Object-store listings are cached per process; other writers' new files must be seen.
      self.fs.invalidate_cache(path)
      return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
    except FileNotFoundError:
      return []

  def read_bytes(self, path: str) -> bytes:
    return self.fs.cat_file(path)

  def makedirs(self, path: str) -> None:
    self.fs.makedirs(path, exist_ok=True)

  def write_atomic(self, path: str, data: bytes) -> None:
    if not self.local:
      self.fs.pipe_file(path, data)
      return
    tmp = _durable_temp(path, data)
    try:
      os.replace(tmp, path)
    except BaseException:
      _unlink(tmp)
      raise

  def create_exclusive(self, path: str, data: bytes) -> bool:
    if self.local:
      tmp = _durable_temp(path, data)
      try:
        os.link(tmp, path)  # atomic: fails with FileExistsError if someone else won
        return True
      except FileExistsError:
        return False
      finally:
        _unlink(tmp)
    try:
      with self.fs.open(path, "xb") as f:
        f.write(data)
      return True
    except FileExistsError:
      return False
    except (ValueError, NotImplementedError, TypeError):
      if not self._warned:
        warnings.warn(f"{type(self.fs).__name__} has no exclusive create; concurrent registry "
                      "writers are not race-free on this store", RuntimeWarning, stacklevel=2)
        self._warned = True
      if self.fs.exists(path):
        return False
      self.fs.pipe_file(path, data)
      return True

  def put_file(self, local_path: str, path: str) -> None:
    if self.local:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      import shutil
      shutil.copyfile(local_path, path)
    else:
      self.fs.put_file(local_path, path)

  def get_file(self, path: str, local_path: str) -> None:
    self.fs.get_file(path, local_path)

  def make_read_only(self, paths: Iterable[str]) -> None:
    """Versions are immutable: locally their files lose write permission (a guard against
    accidents; the sha256 check on load is what catches deliberate changes)."""
    if not self.local:
      return
    for p in paths:
      try:
        os.chmod(p, 0o444)
      except OSError:
        pass


def unreachable(e: BaseException) -> bool:
  """The store did not answer (refused, reset, timed out) after the client's own retries."""
  from jaxclf.data.sources.remote import unreachable as no_answer  # noqa: PLC0415
  return no_answer(e)


def gave_up(url: str) -> str:
  """Which client retried a store's requests, and how often (for the one-line error)."""
  from jaxclf.data.sources.remote import gave_up as note  # noqa: PLC0415
  return note(url)


def _unlink(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass
