"""The options of an ingest (`jaxclf data ingest`, local or Apache Beam), and the progress line
every stage of it prints.

`IngestOptions.provenance_options()` are the options that shape the output: manifest.json records
them, and a resumed run must match them.
"""
from __future__ import annotations

import dataclasses
import sys

from jaxclf.data import decode


@dataclasses.dataclass
class IngestOptions:
  out: str
  name: str = ""
  license: str = "unknown"  # say what the data may be used for; it goes into the card
  description: str = ""
  channels: int = 3  # only for the decode check; shards keep the original bytes
  max_pixels: int = decode.DEFAULT_MAX_PIXELS
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  shard_mb: float = 64.0  # target shard size; shards hold whole records
  workers: int = 0  # decode-check threads; 0 = min(4, 2 x cores)
  http_timeout: float = 30.0
  http_retries: int = 3
  http_concurrency: int = 8
  tfds_data_dir: str = ""
  force: bool = False  # replace an existing, different dataset in `out`
  index: str = "parquet"  # per-record index: Parquet files next to the shards, or "json" (inline)
  near_duplicates: bool = True  # the dHash near-duplicate report (slow at millions of images)

  def provenance_options(self) -> dict:
    """The options that shape the output (so they are recorded, and a resume must match)."""
    return {"channels": self.channels, "max_pixels": self.max_pixels,
            "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
            "seed": self.seed, "shard_mb": self.shard_mb,
            **({} if self.near_duplicates else {"near_duplicates": False})}


def log(msg: str) -> None:
  print(f"[ingest] {msg}", file=sys.stderr, flush=True)
