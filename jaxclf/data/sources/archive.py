"""Safe extraction of .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz and .zip archives of images.

An archive from the internet is hostile until shown otherwise. Extraction here:
- refuses absolute names and any `..` component (path traversal);
- never creates links: symlinks and hard links are skipped and reported (no symlink escape);
- skips devices, FIFOs and other special members;
- counts the bytes actually written (not what headers claim) against per-member and total
  limits, and caps the number of members (zip/tar bombs), raising DataError when exceeded.
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile

from jaxclf.data.types import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
MAX_TOTAL_BYTES = 64 * 1024 ** 3
MAX_MEMBER_BYTES = 1024 ** 3
MAX_MEMBERS = 10_000_000
_CHUNK = 1 << 20


def is_archive(uri: str) -> bool:
  name = uri.split("?", 1)[0].lower()
  return name.endswith(ARCHIVE_SUFFIXES)


def _safe_relpath(name: str) -> str | None:
  """The member's path relative to the destination, or None if it could escape it."""
  name = name.replace("\\", "/")
  if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
    return None
  parts = [p for p in name.split("/") if p not in ("", ".")]
  if not parts or any(p == ".." for p in parts):
    return None
  return os.path.join(*parts)


class _Budget:
  def __init__(self, max_total: int, max_member: int, max_members: int, archive: str):
    self.max_total, self.max_member, self.max_members = max_total, max_member, max_members
    self.total = 0
    self.members = 0
    self.archive = archive

  def count_member(self):
    self.members += 1
    if self.members > self.max_members:
      raise DataError(f"{self.archive}: more than {self.max_members} members; refusing to extract")

  def copy(self, src, dest_path: str, name: str):
    written = 0
    with open(dest_path, "wb") as out:
      while chunk := src.read(_CHUNK):
        written += len(chunk)
        self.total += len(chunk)
        if written > self.max_member:
          raise DataError(f"{self.archive}: member {name!r} expands past {self.max_member} bytes; "
                          "refusing (archive bomb guard)")
        if self.total > self.max_total:
          raise DataError(f"{self.archive}: contents expand past {self.max_total} bytes; refusing "
                          "(archive bomb guard)")
        out.write(chunk)


def extract(archive_path: str, dest: str, *, name: str | None = None,
            max_total_bytes: int = MAX_TOTAL_BYTES, max_member_bytes: int = MAX_MEMBER_BYTES,
            max_members: int = MAX_MEMBERS) -> list[dict]:
  """Extracts regular files into `dest`; returns what was refused as skips {path, stage, reason}."""
  label = name or archive_path
  budget = _Budget(max_total_bytes, max_member_bytes, max_members, label)
  skipped: list[dict] = []
  os.makedirs(dest, exist_ok=True)
  dest_real = os.path.realpath(dest)

  def target(member_name: str) -> str | None:
    rel = _safe_relpath(member_name)
    if rel is None:
      skipped.append({"path": f"{label}#{member_name}", "stage": "archive",
                      "reason": "unsafe member path (absolute or '..'); not extracted"})
      return None
    path = os.path.join(dest_real, rel)
    # Belt and braces: a directory created earlier can never be a link (we create no links),
    # but check the resolved parent anyway.
    if not os.path.realpath(os.path.dirname(path)).startswith(dest_real):
      skipped.append({"path": f"{label}#{member_name}", "stage": "archive",
                      "reason": "member would land outside the extraction folder"})
      return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  try:
    if zipfile.is_zipfile(archive_path):
      with zipfile.ZipFile(archive_path) as zf:
        for info in zf.infolist():
          budget.count_member()
          if info.is_dir():
            continue
          mode = info.external_attr >> 16
          if stat.S_ISLNK(mode):
            skipped.append({"path": f"{label}#{info.filename}", "stage": "archive",
                            "reason": "symbolic link; links are never extracted"})
            continue
          path = target(info.filename)
          if path is not None:
            with zf.open(info) as src:
              budget.copy(src, path, info.filename)
    else:
      with tarfile.open(archive_path, "r:*") as tf:
        for m in tf:
          budget.count_member()
          if m.isdir():
            continue
          if m.issym() or m.islnk():
            skipped.append({"path": f"{label}#{m.name}", "stage": "archive",
                            "reason": f"{'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}; "
                                      "links are never extracted"})
            continue
          if not m.isfile():
            skipped.append({"path": f"{label}#{m.name}", "stage": "archive",
                            "reason": "special file (device, FIFO); not extracted"})
            continue
          path = target(m.name)
          if path is not None:
            src = tf.extractfile(m)
            budget.copy(src, path, m.name)
  except DataError:
    raise
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    raise DataError(f"{label}: not a readable archive ({type(e).__name__}: {e})") from None
  return skipped


def content_root(dest: str) -> str:
  """Archives often wrap everything in one top folder (photos/cat/..., photos/dog/...):
  descend through single wrapper folders that hold no files."""
  root = dest
  while True:
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    dirs = [e for e in entries if e.is_dir()]
    if len(entries) == 1 and len(dirs) == 1:
      root = dirs[0].path
    else:
      return root


def remove(path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)
