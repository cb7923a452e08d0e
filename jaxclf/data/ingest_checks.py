"""The decode check of every candidate an ingest lists, resumable: finished checks go to a journal
(work/checks.jsonl) and are reused while the file is unchanged, and remote bytes are kept as
content-addressed blobs (work/blobs/) so that nothing is downloaded twice; the shard writer reads
them back (jaxclf.data.ingest_shards).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

from jaxclf.data.ingest_options import IngestOptions, log
from jaxclf.data.sources import plan as plan_lib
from jaxclf.data.sources import remote, scan

CHECK_BATCH = 256


def _identity(uri: str) -> str:
  """What must not have changed for a journaled check to be reused."""
  if remote.is_remote(uri):
    return ""  # remote bytes are kept as blobs by sha256; the check is reused while its blob is
  try:
    st = os.stat(remote.local_path(uri))
    return f"{st.st_size}:{st.st_mtime_ns}"
  except OSError:
    return ""  # archive members (extracted in .partial), in-memory arrays: fixed for the run


def blob_path(work: str, sha: str) -> str:
  return os.path.join(work, "blobs", sha[:2], sha)


def _keeping_blobs(c: plan_lib.Candidate, work: str) -> Callable:
  """Wraps a remote reader so the fetched bytes are kept (content-addressed) for the shard
  writer and for a resumed run: nothing is downloaded twice."""
  def read():
    data, err = c.read()
    if data is not None:
      path = blob_path(work, hashlib.sha256(data).hexdigest())
      if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{id(data)}"
        with open(tmp, "wb") as f:
          f.write(data)
        os.replace(tmp, path)
    return data, err
  return read


def read_journal(path: str, key: str) -> dict[str, dict]:
  """Rows of a JSON-lines journal by `key`; a line torn by a crash ends it (all before is good)."""
  done: dict[str, dict] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          break
        done[row[key]] = row
  return done


def check_resumable(candidates: list[plan_lib.Candidate], work: str, opts: IngestOptions,
                    keep_blobs: bool) -> list[scan.Checked]:
  journal = os.path.join(work, "checks.jsonl")
  done = read_journal(journal, "uri")
  results: dict[str, scan.Checked] = {}
  todo = []
  for c in candidates:
    row = done.get(c.uri)
    blob_ok = (not keep_blobs or (row and row["checked"]["skip"]) or
               (row and os.path.exists(blob_path(work, row["checked"]["sha256"]))))
    if row is not None and row["identity"] == _identity(c.uri) and blob_ok:
      results[c.uri] = scan.Checked(**row["checked"])
    else:
      todo.append(c)
  if results:
    log(f"resuming: {len(results)} files already checked, {len(todo)} to go")
  fields = [f.name for f in dataclasses.fields(scan.Checked)]
  with open(journal, "a") as f:
    for start in range(0, len(todo), CHECK_BATCH):
      batch = todo[start:start + CHECK_BATCH]
      items = [(c.uri, _keeping_blobs(c, work) if keep_blobs else c.read) for c in batch]
      checked = scan.check_files(items, channels=opts.channels, max_pixels=opts.max_pixels,
                                 workers=opts.workers or None)
      for c, chk in zip(batch, checked):
        results[c.uri] = chk
        f.write(json.dumps({"uri": c.uri, "identity": _identity(c.uri),
                            "checked": {k: getattr(chk, k) for k in fields}}) + "\n")
      f.flush()
      os.fsync(f.fileno())
      log(f"checked {min(start + CHECK_BATCH, len(todo)) + len(candidates) - len(todo)}"
           f"/{len(candidates)}")
  return [results[c.uri] for c in candidates]
