"""Datasets written by `jaxclf data ingest`: manifest.json + ArrayRecord shards, local or remote.

Records are read by random access (ArrayRecord, group_size 1), so a global shuffle touches one
record at a time and memory stays flat whatever the dataset's size. Remote datasets (s3://,
https://) have their shards fetched once into the cache dir and checked against the manifest's
sha256 (the ArrayRecord reader reads local files only).

Record layout (`RECORD_FORMAT`): b"JXR1" | u32 little-endian header length | UTF-8 JSON header
{"label", "sha256", "uri", "format"} | the original encoded image bytes, untouched.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

import numpy as np

from jaxclf.data.types import DataError, Dataset, Split
from jaxclf.data.sources import remote, scan
from jaxclf.hashing import sha256_file

MANIFEST = "manifest.json"
FORMAT_NAME = "jaxclf-ingested"
# 1: manifest.json lists every record ("records"). 2: manifest.json keeps the summary and the
# per-record index is in Parquet files next to the shards (INDEX_DIR, one file per shard, same
# order as the shard), so a 100M-image manifest stays small. Readers take both.
FORMAT_VERSION = 2
INDEX_DIR = "index"
INDEX_COLUMNS = (("uri", "string"), ("sha256", "string"), ("size", "int64"), ("format", "string"),
                 ("height", "int32"), ("width", "int32"), ("label", "int32"), ("dhash", "string"))
RECORD_MAGIC = b"JXR1"
RECORD_FORMAT = "JXR1 | u32le header length | JSON header {label, sha256, uri, format} | image bytes"


def encode_record(image: bytes, label: int, sha256: str, uri: str, fmt: str) -> bytes:
  header = json.dumps({"label": int(label), "sha256": sha256, "uri": uri, "format": fmt},
                      sort_keys=True, separators=(",", ":")).encode()
  return RECORD_MAGIC + struct.pack("<I", len(header)) + header + image


def decode_record(record: bytes) -> tuple[dict, bytes]:
  if record[:4] != RECORD_MAGIC:
    raise DataError("not a jaxclf record (bad magic); was this shard written by `jaxclf data ingest`?")
  (n,) = struct.unpack_from("<I", record, 4)
  header = json.loads(record[8:8 + n])
  return header, record[8 + n:]


class ShardSource:
  """Grain random-access source over one split's shards: [i] -> {'image': bytes, 'label': int}.

  The ArrayRecord reader opens lazily (and again after pickling, in Grain worker processes).
  """

  def __init__(self, shards: list[tuple[str, int]], labels: np.ndarray):
    self.shards = shards  # (local path, records to read from its start)
    self.labels = labels
    self._source = None
    self._lock = threading.Lock()  # Grain read threads may all ask for the reader at once

  def _open(self):
    if self._source is None:
      with self._lock:
        if self._source is None:
          from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: PLC0415
          # "path[0:n]" tells the reader the record count: no file is opened to count.
          self._source = ArrayRecordDataSource([f"{p}[0:{n}]" for p, n in self.shards if n])
    return self._source

  def __len__(self) -> int:
    return int(len(self.labels))

  def _record(self, raw: bytes) -> dict[str, Any]:
    header, image = decode_record(raw)
    return {"image": image, "label": int(header["label"])}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    return self._record(self._open()[index])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._record(r) for r in self._open().__getitems__([int(i) for i in indices])]

  def header(self, index: int) -> dict:
    return decode_record(self._open()[int(index)])[0]

  def __getstate__(self):
    return {"shards": self.shards, "labels": self.labels}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = None
    self._lock = threading.Lock()

  def __repr__(self) -> str:  # Grain logs repr(source); keep it short
    return f"ShardSource(n={len(self)}, shards={len(self.shards)})"


def read_manifest(uri: str, opener: remote.Opener | None = None) -> dict:
  """manifest.json of a dataset directory or URL, validated."""
  opener = opener or remote.Opener()
  base = uri.rstrip("/")
  path = base + "/" + MANIFEST
  data, err = opener.read(path, max_bytes=1 << 34)
  if data is None:
    raise DataError(f"{uri!r} is not an ingested dataset: cannot read {MANIFEST} ({err})")
  try:
    manifest = json.loads(data)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if manifest.get("format") != FORMAT_NAME:
    raise DataError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
  if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
    raise DataError(f"{path}: written by a newer jaxclf (format_version "
                    f"{manifest['format_version']} > {FORMAT_VERSION}); upgrade jaxclf")
  return manifest




def _index_schema():
  import pyarrow as pa  # noqa: PLC0415 - only datasets with a Parquet index need it
  return pa.schema([(name, getattr(pa, kind)()) for name, kind in INDEX_COLUMNS])


def write_index(out: str, manifest: dict) -> dict:
  """Moves manifest["records"] into INDEX_DIR/<shard name>.parquet (format_version 2) and
  returns the manifest as it is written: summary plus an "index" section naming the files."""
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415
  manifest = dict(manifest)
  records = manifest.pop("records")
  os.makedirs(os.path.join(out, INDEX_DIR), exist_ok=True)
  files = {}
  for split, info in manifest["splits"].items():
    files[split], start = [], 0
    for shard in info["shards"]:
      rows = records[split][start:start + int(shard["records"])]
      start += int(shard["records"])
      rel = f"{INDEX_DIR}/{shard['file'].rsplit('.', 1)[0]}.parquet"
      table = pa.Table.from_pylist([{k: r[k] for k, _ in INDEX_COLUMNS} for r in rows],
                                   schema=_index_schema())
      tmp = os.path.join(out, rel + ".tmp")
      pq.write_table(table, tmp)
      os.replace(tmp, os.path.join(out, rel))
      files[split].append({"file": rel, "records": len(rows)})
    if start != len(records[split]):
      raise ValueError(f"{split}: {len(records[split])} records but the shards hold {start}")
  wanted = {os.path.basename(f["file"]) for fs in files.values() for f in fs}
  for name in os.listdir(os.path.join(out, INDEX_DIR)):  # an earlier layout's files
    if name not in wanted:
      os.unlink(os.path.join(out, INDEX_DIR, name))
  manifest["format_version"] = 2
  manifest["index"] = {"format": "parquet", "columns": [k for k, _ in INDEX_COLUMNS], "files": files}
  return manifest


def read_records(uri: str, manifest: dict, opener: remote.Opener | None = None,
                 splits=None) -> dict[str, list[dict]]:
  """split -> the per-record index (uri, sha256, size, format, height, width, label, dhash), in
  shard order, from manifest.json itself (format_version 1) or its Parquet files (2)."""
  if "records" in manifest:
    return {s: r for s, r in manifest["records"].items() if splits is None or s in splits}
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415
  opener = opener or remote.Opener()
  out = {}
  for split, files in manifest["index"]["files"].items():
    if splits is not None and split not in splits:
      continue
    out[split] = []
    for f in files:
      path = uri.rstrip("/") + "/" + f["file"]
      data, err = opener.read(path, max_bytes=1 << 36)
      if data is None:
        raise DataError(f"{path}: cannot read the record index ({err}); re-run `jaxclf data ingest`")
      try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
      except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet index ({type(e).__name__}: {e})") from None
      if len(rows) != int(f["records"]):
        raise DataError(f"{path}: {len(rows)} records, the manifest says {f['records']}")
      out[split] += rows
  return out


def cache_root(cfg=None) -> str:
  d = (getattr(cfg, "cache_dir", "") if cfg is not None else "") or os.environ.get("JAXCLF_CACHE")
  return os.path.join(os.path.expanduser(d or "~/.cache/jaxclf"), "ingested")


def local_shard_dir(uri: str, manifest: dict, cfg=None, opener: remote.Opener | None = None) -> str:
  """The local folder holding the shards: the dataset itself, or a verified cache copy."""
  if not remote.is_remote(uri):
    return remote.local_path(uri)
  opener = opener or remote.Opener()
  dest = os.path.join(cache_root(cfg), manifest["version"])
  for split in manifest["splits"].values():
    for shard in split["shards"]:
      path = os.path.join(dest, shard["file"])
      marker = path + ".sha256"
      if os.path.exists(path) and os.path.exists(marker) and open(marker).read() == shard["sha256"]:
        continue
      remote.download(opener, uri.rstrip("/") + "/" + shard["file"], path)
      got = sha256_file(path)
      if got != shard["sha256"]:
        os.unlink(path)
        raise DataError(f"{uri}/{shard['file']}: sha256 {got[:12]}... does not match the manifest "
                        f"({shard['sha256'][:12]}...); the dataset is corrupt or being rewritten")
      with open(marker, "w") as f:
        f.write(shard["sha256"])
  return dest


def load(cfg) -> Dataset:
  uri = str(cfg.source)
  if uri.startswith("file://"):
    uri = remote.local_path(uri)
  opener = remote.Opener()
  manifest = read_manifest(uri, opener)
  shard_dir = local_shard_dir(uri, manifest, cfg, opener)
  limit = int(getattr(cfg, "limit_per_split", 0) or 0)
  channels = int(getattr(cfg, "channels", 3) or 3)
  class_names = list(manifest["classes"])
  splits, kept, shapes = {}, [], set()
  index = read_records(uri, manifest, opener)
  for name in ("train", "val", "test"):
    info = manifest["splits"].get(name, {"shards": [], "count": 0})
    records = index.get(name, [])
    n = min(len(records), limit) if limit else len(records)
    # Records were shuffled (seeded) when written, so the first n are a fair sample.
    shards, left = [], n
    for shard in info["shards"]:
      path = os.path.join(shard_dir, shard["file"])
      if not os.path.exists(path):
        raise DataError(f"{uri}: shard {shard['file']} is missing; re-run `jaxclf data ingest`")
      take = min(left, int(shard["records"]))
      shards.append((path, take))
      left -= take
    labels = np.asarray([r["label"] for r in records[:n]], np.int32)
    splits[name] = Split(ShardSource(shards, labels), labels)
    kept += [(r["sha256"], r["label"], name) for r in records[:n]]
    shapes |= {(r["height"], r["width"]) for r in records[:n]}
  version = manifest["version"] if not limit else scan.content_version(class_names, kept)
  image_shape = (*shapes.pop(), channels) if len(shapes) == 1 else None
  report = dict(manifest.get("report", {}))
  report.update({"source": uri, "ingested_version": manifest["version"],
                 "license": manifest.get("license"), "limit_per_split": limit})
  return Dataset(name=manifest.get("name") or os.path.basename(uri.rstrip("/")),
                 class_names=class_names, splits=splits, version=version, encoded=True,
                 image_shape=image_shape, report=report)
