"""Ingest benchmarks: the local path against the Beam DirectRunner -> JSON on stdout.

  python bench/ingest.py                               # 20,000 images: local vs Beam (2 workers)
  python bench/ingest.py --images 500 --rounds 1       # a smoke run
  python bench/ingest.py --case million                # 1M tiny PNGs through the DirectRunner,
                                                       # at 250k / 500k / 1M (--steps to change)

Both cases run each ingest as its own process through the CLI, as a user would
(`python -m jaxclf.data.data_cli data ingest ...`, which re-executes itself in .venv-beam for
--runner), and sample the resident memory of the whole process tree (the CLI, the Beam driver
and its worker processes) every 0.2 s: `peak_rss_mb` is the largest sum seen,
`peak_rss_one_process_mb` the largest single process (the runner or the driver).

1. compare: N generated 64x64 JPEGs in 10 class folders, ingested by the local path (threads)
   and by Beam's DirectRunner with --direct_num_workers=2 --direct_running_mode=multi_processing,
   alternating, --rounds times. Reports img/s for each, the ratio Beam / local, peak RSS, and that
   both wrote the same dataset version.
2. million: 28x28 PNGs written once into class folders, then CSV manifests of the first 250k,
   500k and 1M files, each ingested by the DirectRunner (in_memory by default, see --beam-mode;
   near-duplicate report off: it compares every pair within a dHash band bucket). Reports wall
   time, img/s and peak RSS per step, and the dataset's manifest.json + Parquet index size
   against the one-file (format_version 1) manifest of the same records. --max-rss-mb stops a
   step whose process tree outgrows it (recorded as "stopped"); --out is rewritten after each
   step; a kept --work folder reuses its PNGs. The 1M run (about an hour on 2 cores):
     nice -n 10 python bench/ingest.py --case million --work SCRATCH_DIR --max-rss-mb 12000
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402
from data import make_folder  # noqa: E402  (bench/data.py: synthetic photo-like JPEGs)

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def log(msg):
  print(f"[bench] {msg}", file=sys.stderr, flush=True)


class TreeRss:
  """Peak of the summed RSS of a process and all its descendants, sampled in a thread.

  With `limit_mb`, the tree is killed once its sum passes the limit (`killed` is then set), so a
  run that outgrows a shared machine stops itself rather than pushing others out of memory.
  """

  def __init__(self, pid: int, every: float = 0.2, limit_mb: float = 0):
    self.proc, self.every, self.peak, self.peak_one = psutil.Process(pid), every, 0, 0
    self.limit, self.killed = limit_mb * 2**20, False
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()

  def _run(self):
    while not self._stop.is_set():
      try:
        procs = [self.proc] + self.proc.children(recursive=True)
        total = 0
        for p in procs:
          try:
            rss = p.memory_info().rss
          except psutil.Error:
            continue
          total += rss
          self.peak_one = max(self.peak_one, rss)
        self.peak = max(self.peak, total)
        if self.limit and total > self.limit:
          self.killed = True
          for p in reversed(procs):  # children first, so none is re-parented and missed
            try:
              p.kill()
            except psutil.Error:
              pass
          return
      except psutil.Error:
        pass
      self._stop.wait(self.every)

  def stop(self) -> tuple[float, float]:
    """-> (peak summed over the tree, peak of any one process), MB."""
    self._stop.set()
    self._t.join()
    return round(self.peak / 2**20, 1), round(self.peak_one / 2**20, 1)


def run_ingest(src: str, out: str, *extra: str, limit_mb: float = 0) -> dict:
  shutil.rmtree(out, ignore_errors=True)
  cmd = [sys.executable, "-m", "jaxclf.data.data_cli", "data", "ingest", src, "--out", out,
         "--shard-mb", "64", *extra]
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  rss = TreeRss(proc.pid, limit_mb=limit_mb)
  stdout, stderr = proc.communicate()
  wall = time.perf_counter() - t
  peak, peak_one = rss.stop()
  if rss.killed:
    log(f"  stopped after {wall:.1f} s: the process tree passed {limit_mb:.0f} MB")
    return {"wall_s": round(wall, 2), "peak_rss_mb": peak, "peak_rss_one_process_mb": peak_one,
            "stopped": f"killed: process tree RSS passed --max-rss-mb {limit_mb:.0f}"}
  if proc.returncode != 0:
    raise SystemExit(f"ingest failed ({' '.join(cmd)}):\n{stderr[-3000:]}")
  summary = json.loads(stdout.strip().splitlines()[-1])
  log(f"  {wall:.1f} s, peak RSS {peak:.0f} MB (tree), {peak_one:.0f} MB (one process)")
  return {"wall_s": round(wall, 2), "peak_rss_mb": peak, "peak_rss_one_process_mb": peak_one,
          "version": summary["version"],
          "records": summary["records"], "skipped": summary["skipped"]}


def case_compare(n: int, rounds: int, work: str, extra: list[str]) -> dict:
  folder = os.path.join(work, "photos")
  log(f"writing {n} 64x64 JPEGs")
  make_folder(folder, n, 64)
  runs = {"local": [], "beam": []}
  for r in range(rounds):  # alternate, so load from other users hits both alike
    log(f"round {r + 1}: local")
    runs["local"].append(run_ingest(folder, os.path.join(work, "local"), *extra))
    log(f"round {r + 1}: beam DirectRunner, 2 workers, multi_processing")
    runs["beam"].append(run_ingest(folder, os.path.join(work, "beam"), "--runner=direct", *MULTI,
                                   *extra))
  ips = {k: [n / x["wall_s"] for x in v] for k, v in runs.items()}
  return {
      "case": "compare", "images": n, "image": "64x64 JPEG q90, 10 classes",
      "local_images_per_s": round(float(np.mean(ips["local"])), 1),
      "beam_direct_images_per_s": round(float(np.mean(ips["beam"])), 1),
      "ratio_beam_over_local": round(float(np.mean(ips["beam"]) / np.mean(ips["local"])), 3),
      "local_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["local"]),
      "beam_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["beam"]),
      "same_version": len({x["version"] for v in runs.values() for x in v}) == 1,
      "beam_options": MULTI, "both_options": extra, "runs": runs,
      "note": "wall time of the whole CLI command (process start, listing, checks, split, shard "
              "writes, manifest); Beam's includes starting .venv-beam and its workers",
  }


def _tiny_png(rng: np.random.Generator) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def tiny_paths(root: str, n: int, classes: int = 10) -> list[tuple[str, str]]:
  """[(path, class)] of n tiny PNGs in class folders, 1,000 per sub-folder."""
  return [(os.path.join(root, f"c{i % classes}", f"{i // (classes * 1000):04d}", f"{i:07d}.png"),
           f"c{i % classes}") for i in range(n)]


def write_tiny(root: str, n: int, classes: int = 10, seed: int = 0) -> list[tuple[str, str]]:
  """Writes n 28x28 greyscale PNGs at tiny_paths(root, n) -> those [(path, class)]."""
  rng = np.random.default_rng(seed)
  files = tiny_paths(root, n, classes)
  for i, (path, _) in enumerate(files):
    if i % (classes * 1000) < classes:
      os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(_tiny_png(rng))
    if (i + 1) % 100_000 == 0:
      log(f"wrote {i + 1} PNGs")
  return files


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def manifest_sizes(out: str) -> dict:
  from jaxclf.data.sources import ingested  # noqa: PLC0415
  m = ingested.read_manifest(out)
  one_file = {**m, "format_version": 1, "records": ingested.read_records(out, m)}
  one_file.pop("index", None)
  return {"manifest_json_bytes": os.path.getsize(os.path.join(out, ingested.MANIFEST)),
          "parquet_index_bytes": dir_bytes(os.path.join(out, ingested.INDEX_DIR)),
          "parquet_index_files": len(os.listdir(os.path.join(out, ingested.INDEX_DIR))),
          "one_file_manifest_bytes": len(json.dumps(one_file, indent=1, sort_keys=True)) + 1}


def case_million(steps: list[int], work: str, beam_extra: list[str], limit_mb: float = 0,
                 partial_out: str = "") -> dict:
  root = os.path.join(work, "tiny")
  done = os.path.join(root, f"complete-{max(steps)}")  # a kept --work folder skips regeneration
  t = time.perf_counter()
  if os.path.exists(done):
    log(f"reusing the {max(steps)} PNGs in {root}")
    files = tiny_paths(root, max(steps))
    gen_s = None
  else:
    log(f"writing {max(steps)} 28x28 PNGs")
    files = write_tiny(root, max(steps))
    gen_s = round(time.perf_counter() - t, 1)
    open(done, "w").close()
  result = {"case": "million", "image": "28x28 greyscale PNG (random pixels), 10 classes",
            "generate_s": gen_s, "beam_options": beam_extra, "max_rss_mb": limit_mb or None,
            "steps": [],
            "note": "DirectRunner keeps each GroupByKey's values in memory (per shard, per class, "
                    "per sha256 group) and the driver reads every record's metadata to build the "
                    "report; a distributed runner spills shuffles to disk across workers."}
  for n in steps:
    csv_path = os.path.join(work, f"first-{n}.csv")
    with open(csv_path, "w") as f:
      f.write("uri,label\n" + "".join(f"{p},{c}\n" for p, c in files[:n]))
    out = os.path.join(work, f"ds-{n}")
    log(f"beam DirectRunner on {n} images")
    r = run_ingest(csv_path, out, "--runner=direct", "--no-near-duplicates", *beam_extra,
                   limit_mb=limit_mb)
    r["images"] = n
    if "stopped" not in r:
      r.update({"images_per_s": round(n / r["wall_s"], 1), **manifest_sizes(out)})
    result["steps"].append(r)
    shutil.rmtree(out, ignore_errors=True)
    if partial_out:  # each step's figures survive a later step's failure (the file, not stdout)
      with open(partial_out, "w") as f:
        json.dump({**result, "partial": True}, f, indent=2)
    if "stopped" in r:
      break
  return result


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--case", choices=("compare", "million"), default="compare")
  ap.add_argument("--images", type=int, default=20_000, help="compare: images")
  ap.add_argument("--rounds", type=int, default=1, help="compare: alternating rounds")
  ap.add_argument("--no-near-duplicates", action="store_true",
                  help="compare: both engines skip the dHash report (bench/data.py's synthetic "
                       "images are smooth fields: 20,000 of them give 8.4 M near pairs)")
  ap.add_argument("--steps", default="250000,500000,1000000", help="million: dataset sizes")
  # in_memory by default for the million case: multi_processing ran at about the same img/s with
  # a larger peak RSS summed over its processes, which each grow with the data they are handed.
  ap.add_argument("--beam-workers", type=int, default=1, help="million: DirectRunner workers")
  ap.add_argument("--beam-mode", default="in_memory",
                  choices=("multi_processing", "multi_threading", "in_memory"),
                  help="million: --direct_running_mode")
  ap.add_argument("--max-rss-mb", type=float, default=0,
                  help="million: kill a step whose process tree passes this RSS (0: no limit)")
  ap.add_argument("--work", default="", help="scratch folder (default: a temp dir, removed)")
  ap.add_argument("--out", default="docs/results/ingest.json", help="also write the JSON here")
  args = ap.parse_args(argv)
  work = args.work or tempfile.mkdtemp(prefix="jaxclf-bench-ingest-")
  try:
    if args.case == "compare":
      result = case_compare(args.images, args.rounds, work,
                            ["--no-near-duplicates"] if args.no_near_duplicates else [])
    else:
      extra = [f"--direct_num_workers={args.beam_workers}", f"--direct_running_mode={args.beam_mode}"]
      result = case_million([int(x) for x in args.steps.split(",")], work, extra,
                            args.max_rss_mb, args.out)
  finally:
    if not args.work:
      shutil.rmtree(work, ignore_errors=True)
  result["cpu_count"] = os.cpu_count()
  emit(result, args.out or None)
  return 0


if __name__ == "__main__":
  sys.exit(main())
