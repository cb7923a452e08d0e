"""`python -m jaxclf.main ...` that also writes a hash of the rows the trainer was handed.

  python bench/jax_rows.py ROWS_JSON --config=configs/cnn.py --workdir=... [--config.x=y ...]

Runs jaxclf.main unchanged in this process, with one hook: jaxclf.data.dataset.load_dataset is
wrapped (before the training loop imports it; no jax is imported first) to keep the Dataset that
jaxclf.train.loop received. When the run ends, each split's rows (the
records of split.source: what the input pipeline reads) are hashed with bench/row_hash.py and
written to ROWS_JSON with the seconds the hashing took (bench/race.py takes them off the wall
time). bench/race.py compares these with the rows bench/torch_anchor.py trained on.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from row_hash import _row_digest, digest_of  # noqa: E402


def split_rows_sha256(split) -> str:
  source = split.source
  if hasattr(source, "images") and hasattr(source, "labels"):  # ArraySource: arrays in memory
    pairs = zip(source.images, source.labels)
  else:  # any other record source: the records as the pipeline reads them
    pairs = ((source[i]["image"], source[i]["label"]) for i in range(len(source)))
  return digest_of(_row_digest(x, y) for x, y in pairs)


def main(argv: list[str]) -> None:
  out = argv[0]
  import jaxclf.data.dataset as dataset_mod
  assert "jaxclf.train.loop" not in sys.modules and "jax" not in sys.modules
  seen = []
  original = dataset_mod.load_dataset

  def recording_load_dataset(*args, **kwargs):
    dataset = original(*args, **kwargs)
    if sys._getframe(1).f_globals.get("__name__") == "jaxclf.train.loop":  # the trainer's own
      seen.append(dataset)
    return dataset
  dataset_mod.load_dataset = recording_load_dataset
  sys.argv = ["jaxclf.main", *argv[1:]]
  try:
    runpy.run_module("jaxclf.main", run_name="__main__", alter_sys=True)
  finally:
    if seen:
      t0 = time.time()
      rows = {name: split_rows_sha256(s) for name, s in seen[0].splits.items()}
      counts = {name: len(s.source) for name, s in seen[0].splits.items()}
      with open(out, "w") as f:
        json.dump({"rows_sha256": rows, "counts": counts, "hash_s": time.time() - t0}, f)


if __name__ == "__main__":
  main(sys.argv[1:])
