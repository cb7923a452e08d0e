"""Which shard each record goes to, and in what order: a pure function of (seed, split, sha256,
uri), shared by the local ingest and the Beam ingest so both write the same shards.

Each record gets a key, the sha256 of (seed, split, content sha256, uri). A split has
`num_shards` shards (from its byte total and the target shard size); a record goes to the shard
whose slice of the 64-bit key space holds its key's first 8 bytes, and records within a shard
are sorted by key. Nothing needs a global sort or the order of the input, so a distributed
runner assigns shards record by record. The key order is a seeded shuffle: a prefix of a split
(`limit_per_split`) is a fair sample. Shards whose slice received no record are not written;
the rest are numbered in key-space order.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

MB = 1024 * 1024


def record_key(seed: int, split: str, sha256: str, uri: str) -> str:
  return hashlib.sha256(f"{int(seed)}\x1f{split}\x1f{sha256}\x1f{uri}".encode()).hexdigest()


def num_shards(count: int, total_bytes: int, shard_mb: float) -> int:
  """Shards for a split: enough that each holds about `shard_mb`, at most one per record."""
  if count <= 0:
    return 0
  return max(1, min(count, math.ceil(total_bytes / (shard_mb * MB))))


def slot_of(key: str, n: int) -> int:
  """The key-space slice (0..n-1) a key falls in."""
  return (int(key[:16], 16) * n) >> 64


def shard_name(split: str, i: int, n: int) -> str:
  return f"{split}-{i:05d}-of-{n:05d}.array_record"


def shard_names(split: str, used_slots: Iterable[int]) -> dict[int, str]:
  """slot -> file name, numbering only the slots that received records."""
  used = sorted(set(used_slots))
  return {slot: shard_name(split, i, len(used)) for i, slot in enumerate(used)}
