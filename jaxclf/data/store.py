"""A dataset folder on local disk or in an object store (s3://, gs://), through fsspec: where
the Beam ingest writes its temp files and the dataset. Pickles as its URL, so each Beam worker
opens its own filesystem (credentials come from the worker's environment)."""
from __future__ import annotations

import contextlib
import os

from jaxclf.data.sources import remote


class Store:
  """One folder (local path, s3:// or gs:// URL); paths given to its methods are relative."""

  def __init__(self, url: str):
    self.url = url.rstrip("/")
    self.remote = remote.is_remote(self.url)
    if self.remote:
      self.fs, self.root = remote.Opener().object_store(self.url)
    else:
      import fsspec  # noqa: PLC0415
      self.fs, self.root = fsspec.filesystem("file"), os.path.abspath(remote.local_path(self.url))

  def __getstate__(self):
    return {"url": self.url}

  def __setstate__(self, state):
    self.__init__(state["url"])

  def path(self, rel: str) -> str:
    return f"{self.root}/{rel}" if rel else self.root

  def local_path(self, rel: str) -> str | None:
    """Where to write `rel` directly (local stores), else None: write elsewhere and put()."""
    if self.remote:
      return None
    os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
    return self.path(rel)

  @contextlib.contextmanager
  def _answered(self, rel: str, doing: str):
    """A store that stops answering (after the client's own retries) is one DataError naming
    the object, not a client library's traceback."""
    try:
      yield
    except Exception as e:
      if self.remote and remote.unreachable(e):
        raise remote.store_unreachable(f"{self.url}/{rel}", e, doing) from None
      raise

  def put(self, local: str, rel: str) -> None:
    if not self.remote:
      os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
    with self._answered(rel, "upload"):
      self.fs.put_file(local, self.path(rel))

  def write_text(self, rel: str, text: str) -> None:
    if not self.remote:
      os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
    with self._answered(rel, "upload"), self.fs.open(self.path(rel), "w") as f:
      f.write(text)

  def read_text(self, rel: str) -> str:
    with self.fs.open(self.path(rel), "r") as f:
      return f.read()

  def files(self, rel: str = "") -> list[str]:
    """Files under rel, relative to the store's root, sorted."""
    base = self.path(rel)
    if not self.fs.exists(base):
      return []
    root = self.root.rstrip("/") + "/"
    return sorted(p[len(root):] if p.startswith(root) else p.split(root, 1)[-1]
                  for p in self.fs.find(base))

  def move(self, src_rel: str, dst_rel: str) -> None:
    if self.remote:
      # Object stores have no rename: a server-side copy, then delete (what s3fs's mv does).
      # Spelled out because gcsfs's mv first tries GCS's moveTo, which emulators answer 501
      # and gcsfs retries for ~30 s before it falls back to this same copy + delete.
      with self._answered(dst_rel, "copy"):
        self.fs.copy(self.path(src_rel), self.path(dst_rel))
        self.fs.rm(self.path(src_rel))
    else:
      os.replace(self.path(src_rel), self.path(dst_rel))

  def remove(self, rel: str) -> None:
    if self.fs.exists(self.path(rel)):
      self.fs.rm(self.path(rel), recursive=True)
