"""The shards of an ingested dataset: their layout (jaxclf.data.layout decides which record goes to
which shard; the Beam ingest lays out the same), `{split}-NNNNN-of-MMMMM.array_record` files
written under a temp name and renamed when complete, and a journal of finished shards
(work/shards.jsonl) that a resumed run skips. A full disk becomes one error line naming the folder
and the bytes still needed; the half-written shard is removed, the finished ones kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

from jaxclf import diskspace
from jaxclf.data import layout
from jaxclf.data.ingest_checks import blob_path, read_journal
from jaxclf.data.ingest_options import log
from jaxclf.data.sources import ingested
from jaxclf.data.sources import plan as plan_lib
from jaxclf.data.types import DataError


def shard_layout(plan: plan_lib.Plan, seed: int, shard_mb: float) -> dict[str, list[list[plan_lib.Entry]]]:
  """split -> shards -> entries, by `jaxclf.data.layout` (the Beam ingest lays out the same
  shards): records go to shards by a seeded hash of their content and uri and are sorted by it
  within each shard, so shard order is already a fair mix (a `limit_per_split` prefix has every
  class). A pure function of the plan: a resumed run lays out the same shards."""
  out = {}
  for split in plan_lib.SPLITS:
    entries = plan.split_entries(split)
    n = layout.num_shards(len(entries), sum(e.checked.size for e in entries), shard_mb)
    slots: dict[int, list[tuple[str, plan_lib.Entry]]] = {}
    for e in entries:
      key = layout.record_key(seed, split, e.checked.sha256, e.candidate.uri)
      slots.setdefault(layout.slot_of(key, n), []).append((key, e))
    out[split] = [[e for _, e in sorted(slots[s], key=lambda ke: ke[0])] for s in sorted(slots)]
  return out


shard_name = layout.shard_name


def _entry_bytes(e: plan_lib.Entry, work: str, keep_blobs: bool) -> bytes:
  if keep_blobs:
    path = blob_path(work, e.checked.sha256)
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      if hashlib.sha256(data).hexdigest() == e.checked.sha256:
        return data
  data, err = e.candidate.read()
  if data is None:
    raise DataError(f"{e.candidate.uri}: readable when checked, now fails ({err}); re-run ingest")
  if hashlib.sha256(data).hexdigest() != e.checked.sha256:
    raise DataError(f"{e.candidate.uri}: changed while ingesting (sha256 differs from the check); "
                    "re-run ingest once the source is stable")
  return data


def write_shard(path: str, entries: list[plan_lib.Entry], work: str, keep_blobs: bool) -> dict:
  records = (ingested.encode_record(_entry_bytes(e, work, keep_blobs), e.label, e.checked.sha256,
                                    e.candidate.uri, e.checked.format) for e in entries)
  return write_shard_file(path, records)


def write_shard_file(path: str, records, tmp_suffix: str = ".tmp") -> dict:
  """Encoded records -> one ArrayRecord shard at `path`, written under a temp name and renamed
  when complete. -> its manifest row {file, records, bytes, sha256}."""
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{tmp_suffix}")
  if os.path.exists(tmp):
    os.unlink(tmp)
  # group_size:1 = one record per chunk: what random access (a global shuffle) needs. Images are
  # already compressed, so chunk compression would only spend CPU.
  writer = ArrayRecordWriter(tmp, "group_size:1,uncompressed")
  n = 0
  for record in records:
    writer.write(record)
    n += 1
  writer.close()
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  sha = ingested.sha256_file(tmp)
  size = os.path.getsize(tmp)
  os.replace(tmp, path)
  return {"file": os.path.basename(path), "records": n, "bytes": size, "sha256": sha}


def write_shards(layout, out: str, work: str, keep_blobs: bool) -> dict[str, list[dict]]:
  journal = os.path.join(work, "shards.jsonl")
  done = read_journal(journal, "file")
  result: dict[str, list[dict]] = {}
  with open(journal, "a") as jf:
    for split, shards in layout.items():
      result[split] = []
      for i, entries in enumerate(shards):
        name = shard_name(split, i, len(shards))
        path = os.path.join(out, name)
        row = done.get(name)
        if row and os.path.exists(path) and os.path.getsize(path) == row["bytes"]:
          result[split].append(row)
          continue
        row = write_shard(path, entries, work, keep_blobs)
        jf.write(json.dumps(row) + "\n")
        jf.flush()
        os.fsync(jf.fileno())
        log(f"wrote {name} ({row['records']} records, {row['bytes'] / 1e6:.1f} MB)")
        result[split].append(row)
  return result


def remove_foreign_shards(out: str, layout) -> None:
  """Shard files this layout does not name (a different earlier layout) would confuse readers."""
  wanted = {shard_name(s, i, len(shards)) for s, shards in layout.items() for i in range(len(shards))}
  for name in os.listdir(out):
    if name.endswith(".array_record") and name not in wanted:
      os.unlink(os.path.join(out, name))


def unwritten_bytes(layout, out: str) -> int:
  """About what the shards not yet on disk take (their images plus each record's header), plus
  room for the index, the card and manifest.json."""
  total = 256 * 1024
  for split, shards in layout.items():
    for i, entries in enumerate(shards):
      if not os.path.exists(os.path.join(out, shard_name(split, i, len(shards)))):
        total += sum(e.checked.size + len(e.candidate.uri) + 256 for e in entries)
  return total


@contextlib.contextmanager
def disk_full_is_data_error(out: str, needed: int):
  """A full disk while shards or the manifest are written: the half-written temp files go (their
  space back), finished shards stay for the rerun, no manifest.json is written (it comes last),
  and the user reads one line naming the folder and the bytes."""
  try:
    yield
  except Exception as e:
    if not diskspace.is_enospc(e):
      raise
    for name in os.listdir(out):
      if name.endswith(".tmp"):
        os.unlink(os.path.join(out, name))
    msg = e.message if isinstance(e, diskspace.DiskFullError) else diskspace.message(
        out, needed, "the dataset's shards, index and manifest",
        "free space and rerun the same command (finished shards are kept)")
    raise DataError(msg) from None
