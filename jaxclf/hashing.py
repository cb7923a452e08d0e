"""Content hashes used for dataset versions, artefact checks and registry integrity. stdlib only,
so serving images and Triton python models can import it without jax."""
from __future__ import annotations

import hashlib


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()
