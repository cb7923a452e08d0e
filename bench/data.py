"""Data benchmarks -> JSON on stdout (progress on stderr).

  python bench/data.py                      # ingest + loader throughput (~2 min on 2 cores)
  python bench/data.py --images 4000        # a larger set
  python bench/data.py --larger-than-ram    # stream one epoch over >= 4 GB, report peak RSS
  python bench/data.py --cases photo        # only the photo-size cases (4. below)
  python bench/data.py --cases photo --photo-data DIR   # on an ingested dataset (photo_race's)

1. ingest: images/s of `jaxclf data ingest` on synthetic 256x256 q90 JPEGs, beside a baseline
   doing the minimum (read + full decode, one thread) in the same run.
2. loader: decode + train augmentation (jaxclf.data.transforms.augment: random-resized-crop,
   flip, ImageNet normalisation; batch 64) at 64 and 224 px from the ingested ArrayRecord shards,
   Grain MapDataset ... to_iter_dataset(ReadOptions(num_threads=0/1/2, prefetch_buffer_size=8))
   beside a torch DataLoader (2 workers) doing the identical work on the identical source;
   rounds alternate between the two, and the ratio is Grain / torch (> 1: Grain faster).
3. --larger-than-ram: writes >= --gb GB of encoded JPEG records as shards, then a fresh process
   streams one globally shuffled epoch through Grain (decode + augment) and reports its peak RSS.
4. photo (the input side at photo sizes): JPEG decode + random-resized-crop (0.35-1)
   + flip + brightness/contrast/saturation jitter 0.2 + the weights' normalisation at 128 and
   224 px, batch 32: exactly what training with configs/photos.py runs, i.e. jaxclf's own Grain
   pipeline (pipeline.train_dataset + pipeline.TrainTransform from the resolved config,
   pipeline.to_iterator with the config's data.read_threads and data.prefetch_batches), against a
   torch DataLoader (2 workers, Pillow) doing (a) the identical per-item work (TrainTransform) and
   (b) bench/torch_finetune.py's own hand-written transforms (the race's torch side). Same
   ingested shards, rounds alternating; ratios are Grain / torch (> 1: Grain faster).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxclf.data import decode, transforms  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def log(msg):
  print(f"[bench] {msg}", file=sys.stderr, flush=True)


def synthetic_jpeg(rng: np.random.Generator, h: int, w: int, quality: int = 90) -> bytes:
  """Smooth colour fields plus noise: JPEG sizes like photos (not flat, not pure noise)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  f = rng.uniform(0.01, 0.08, size=4)
  img = np.stack([127 + 90 * np.sin(f[c] * x + f[3] * y + c) for c in range(3)], -1)
  img += rng.normal(0, 12, size=img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def make_folder(root: str, n: int, size: int, classes: int = 10, seed: int = 0) -> int:
  rng = np.random.default_rng(seed)
  total = 0
  for i in range(n):
    d = os.path.join(root, f"class_{i % classes:02d}")
    os.makedirs(d, exist_ok=True)
    data = synthetic_jpeg(rng, size, size)
    total += len(data)
    with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
      f.write(data)
  return total


# ------------------------------------------------------------------------------ ingest

def bench_ingest(folder: str, out: str, n: int, rounds: int = 2) -> dict:
  from jaxclf.data import ingest  # noqa: PLC0415
  paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs)
  base, ing = [], []
  for r in range(rounds):  # alternate, so load from other users hits both alike
    t = time.perf_counter()
    for p in paths:  # baseline: the least any ingest must do (read + full decode, 1 thread)
      with open(p, "rb") as f:
        decode.decode_image(f.read(), 3)
    base.append(n / (time.perf_counter() - t))
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    m = ingest.ingest(folder, ingest.IngestOptions(out=out, shard_mb=16))
    ing.append(n / (time.perf_counter() - t))
  return {"images": n, "ingest_images_per_s": round(float(np.mean(ing)), 1),
          "baseline_read_decode_1thread_images_per_s": round(float(np.mean(base)), 1),
          "ratio_ingest_over_baseline": round(float(np.mean(ing) / np.mean(base)), 2),
          "runs": {"ingest": [round(x, 1) for x in ing], "baseline": [round(x, 1) for x in base]},
          "ingest_does": "read, sha256, header probe, full decode, dHash, journal, split, shard "
                         "write (re-read + sha256 verify), manifest, card",
          "shards": sum(len(s["shards"]) for s in m["splits"].values()),
          "version": m["version"]}


# ------------------------------------------------------------------------------ loader

def make_work(size: int):
  spec = transforms.PreprocessSpec(image_size=(size, size), channels=3, mean=MEAN, std=STD)
  aug = transforms.AugmentSpec(random_resized_crop=True, hflip=True)

  def work(record, rng):
    img = decode.decode_image(record["image"], 3, target_size=(size, size))
    x = transforms.normalize(transforms.augment(img, rng, spec, aug), spec)
    return {"image": x, "label": record["label"]}
  return work


class _Work:
  """Picklable grain.RandomMapTransform / torch per-item work (same function both sides)."""

  def __init__(self, size):
    self.size = size
    self._fn = None

  def __call__(self, record, rng):
    if self._fn is None:
      self._fn = make_work(self.size)
    return self._fn(record, rng)


def _steady(batch_sizes) -> tuple[int, float]:
  """Images and seconds after the first batch: worker/thread start-up and the first fill of
  the prefetch buffer are excluded for Grain and torch alike (both are one-off per epoch)."""
  it = iter(batch_sizes)
  next(it)
  t = time.perf_counter()
  n = sum(it)
  return n, time.perf_counter() - t


def grain_epoch(src, size: int, threads: int, batch: int, seed: int) -> tuple[int, float]:
  import grain  # noqa: PLC0415
  ds = (grain.MapDataset.source(src).seed(seed).shuffle().random_map(_Work(size)).batch(batch)
        .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8)))
  return _steady(len(b["label"]) for b in ds)


class TorchSet:
  def __init__(self, src, size, seed, work=None):
    self.src, self.work, self.seed = src, work or _Work(size), seed

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    out = self.work(self.src[i], np.random.default_rng([self.seed, i]))
    return out["image"], out["label"]


def _collate(items):
  import torch  # noqa: PLC0415
  return (torch.from_numpy(np.stack([x for x, _ in items])),
          torch.tensor([y for _, y in items]))


def torch_epoch(src, size: int, workers: int, batch: int, seed: int, dataset=None
                ) -> tuple[int, float]:
  import torch  # noqa: PLC0415
  torch.set_num_threads(1)
  g = torch.Generator().manual_seed(seed)
  dl = torch.utils.data.DataLoader(dataset if dataset is not None else TorchSet(src, size, seed),
                                   batch_size=batch,
                                   shuffle=True, drop_last=dataset is not None,
                                   num_workers=workers, generator=g,
                                   collate_fn=None if isinstance(dataset, _RaceSet) else _collate,
                                   prefetch_factor=4 if workers else None,
                                   persistent_workers=False)
  return _steady(len(x) for x, _ in dl)


def bench_loader(ds_dir: str, sizes, thread_counts, rounds: int, batch: int) -> dict:
  import ml_collections  # noqa: PLC0415
  from jaxclf.data.sources import ingested  # noqa: PLC0415
  cfg = ml_collections.ConfigDict({"source": ds_dir, "channels": 3, "limit_per_split": 0})
  src = ingested.load(cfg).splits["train"].source
  results = {}
  for size in sizes:
    runs = {f"grain_threads_{t}": [] for t in thread_counts}
    runs["torch_workers_2"] = []
    grain_epoch(src, size, 2, batch, 99)  # warm the page cache and imports
    for r in range(rounds):
      for t in thread_counts:
        n, s = grain_epoch(src, size, t, batch, r)
        runs[f"grain_threads_{t}"].append(n / s)
      n, s = torch_epoch(src, size, 2, batch, r)
      runs["torch_workers_2"].append(n / s)
      log(f"{size}px round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()))
    mean = {k: round(float(np.mean(v)), 1) for k, v in runs.items()}
    results[f"{size}px"] = {
        "images_per_s": mean, "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "ratio_grain2_over_torch2": round(mean.get("grain_threads_2", 0) / mean["torch_workers_2"], 3),
        "images_per_epoch": len(src)}
  return results


# ------------------------------------------------------------------------- photo sizes

def photo_setup(size: int):
  """configs/photos.py:size=S resolved as training resolves it -> (config, spec, augment spec)."""
  from jaxclf.config import load_config  # noqa: PLC0415
  from jaxclf.train.loop import create_preprocess_spec  # noqa: PLC0415
  config = load_config(os.path.join(REPO, "configs", "photos.py") + f":size={size}", [])
  return (config, create_preprocess_spec(config, [f"c{i}" for i in range(10)]),
          transforms.AugmentSpec.from_config(config.augment))


def grain_photo_epoch(split, config, spec, aug, seed: int) -> tuple[int, float]:
  """One epoch of the trainer's own Grain input (jaxclf/train/inputs.py's Grain path)."""
  from jaxclf.data import pipeline  # noqa: PLC0415
  ds = pipeline.train_dataset(split, epoch=0, seed=seed, batch_size=int(config.train.batch_size),
                              transform=pipeline.TrainTransform(spec, aug,
                                                                int(config.data.max_pixels)),
                              sampler=config.data.sampler)
  it = pipeline.to_iterator(ds, int(config.data.read_threads), int(config.data.prefetch_batches),
                            int(config.data.worker_processes))
  return _steady(len(b["label"]) for b in it)


class _RaceSet:
  """bench/torch_finetune.py's Dataset (its hand-written transforms), picklable."""

  def __init__(self, src, size, config):
    self.src, self.size = src, size
    self.a = argparse.Namespace(crop_scale=tuple(config.augment.crop_scale),
                                crop_fraction=float(config.preprocessing.crop_fraction),
                                jitter=float(config.augment.brightness))
    self._ds = None

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    if self._ds is None:
      sys.path.insert(0, os.path.join(REPO, "bench"))
      import torch_finetune  # noqa: PLC0415
      self._ds = torch_finetune.Photos(self.src, self.size, True, self.a)
    return self._ds[i]


def bench_photo(ds_dir: str, sizes, rounds: int, workers: int = 2) -> dict:
  import ml_collections  # noqa: PLC0415
  from jaxclf.data.sources import ingested  # noqa: PLC0415
  split = ingested.load(ml_collections.ConfigDict({"source": ds_dir, "channels": 3,
                                                    "limit_per_split": 0})).splits["train"]
  src = split.source
  results = {}
  for size in sizes:
    config, spec, aug = photo_setup(size)
    batch = int(config.train.batch_size)
    same = TorchSet(src, size, 0, work=pipeline_transform(spec, aug, config))
    race = _RaceSet(src, size, config)
    keys = ("grain", "torch_same_work", "torch_race_transforms")
    runs = {k: [] for k in keys}
    grain_photo_epoch(split, config, spec, aug, 99)  # warm the page cache and imports
    for r in range(rounds):
      order = keys if r % 2 == 0 else keys[::-1]
      for k in order:
        if k == "grain":
          n, s = grain_photo_epoch(split, config, spec, aug, r)
        else:
          n, s = torch_epoch(src, size, workers, batch, r, dataset=same if k == "torch_same_work"
                             else race)
        runs[k].append(n / s)
      log(f"photo {size}px round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()))
    mean = {k: round(float(np.mean(v)), 1) for k, v in runs.items()}
    results[f"{size}px"] = {
        "images_per_s": mean, "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "ratio_grain_over_torch_same_work": round(mean["grain"] / mean["torch_same_work"], 3),
        "ratio_grain_over_torch_race_transforms":
            round(mean["grain"] / mean["torch_race_transforms"], 3),
        "batch": batch, "grain_read_threads": int(config.data.read_threads),
        "grain_prefetch_batches": int(config.data.prefetch_batches), "torch_workers": workers,
        "augment": {k: v for k, v in dict(config.augment).items() if v},
        "images_per_epoch": len(src)}
    if len(src) // batch < 10:
      results[f"{size}px"]["warning"] = (f"{len(src) // batch} batches per epoch: too few for a "
                                         "steady-state rate (use --images 1000 or more)")
  return results


def pipeline_transform(spec, aug, config):
  """The trainer's per-item transform as a (record, rng) -> {image, label} callable."""
  from jaxclf.data import pipeline  # noqa: PLC0415
  return pipeline.TrainTransform(spec, aug, int(config.data.max_pixels))


# ------------------------------------------------------------------------- larger than RAM

def write_big_shards(out: str, gb: float, image_px: int, seed: int = 0) -> dict:
  """>= gb GB of distinct JPEG records in ArrayRecord shards + manifest, written streaming.

  A pool of encoded photos-like JPEGs is reused with a unique trailer after each EOI marker
  (decoders stop at EOI), so every record is distinct bytes without encoding 10k big images.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415
  from jaxclf.data.sources import ingested, scan  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  pool = [synthetic_jpeg(rng, image_px, image_px, quality=95) for _ in range(48)]
  target = int(gb * 1024 ** 3)
  per_shard = 256 * 1024 ** 2
  shards, records, written, k = [], [], 0, 0
  while written < target:
    name = f"train-{len(shards):05d}.array_record"
    w = ArrayRecordWriter(os.path.join(out, name), "group_size:1,uncompressed")
    count, shard_bytes = 0, 0
    while shard_bytes < per_shard and written < target:
      img = pool[k % len(pool)] + b"jaxclf-bench-%012d" % k
      label = k % 10
      sha = __import__("hashlib").sha256(img).hexdigest()
      w.write(ingested.encode_record(img, label, sha, f"synthetic:{k}", "JPEG"))
      records.append({"uri": f"synthetic:{k}", "sha256": sha, "size": len(img), "format": "JPEG",
                      "height": image_px, "width": image_px, "label": label})
      shard_bytes += len(img)
      written += len(img)
      count += 1
      k += 1
    w.close()
    shards.append({"file": name, "records": count, "bytes": os.path.getsize(os.path.join(out, name)),
                   "sha256": ""})
  classes = [f"c{i}" for i in range(10)]
  manifest = {"format": ingested.FORMAT_NAME, "format_version": 1,  # records inline
              "name": "larger-than-ram", "classes": classes, "num_records": len(records),
              "version": scan.content_version(classes, [(r["sha256"], r["label"], "train")
                                                        for r in records]),
              "splits": {"train": {"count": len(records), "shards": shards},
                         "val": {"count": 0, "shards": []}, "test": {"count": 0, "shards": []}},
              "records": {"train": records, "val": [], "test": []},
              "provenance": {"source": "synthetic", "kind": "bench"}, "report": {}}
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return {"records": len(records), "encoded_bytes": written, "shards": len(shards)}


def stream_epoch(ds_dir: str, size: int, threads: int, batch: int) -> dict:
  """Runs in a fresh process: one shuffled epoch, decode + augment; reports peak RSS."""
  import ml_collections  # noqa: PLC0415
  from jaxclf.data.sources import ingested  # noqa: PLC0415
  rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  src = ingested.load(ml_collections.ConfigDict({"source": ds_dir, "channels": 3})).splits["train"].source
  n, s = grain_epoch(src, size, threads, batch, 0)
  return {"images_epoch": len(src), "images_timed": n, "seconds_timed": round(s, 1),
          "images_per_s": round(n / s, 1),
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          "rss_after_imports_and_manifest_mb": round(rss_start / 1024, 1)}


def bench_larger_than_ram(gb: float, image_px: int, size: int, threads: int, batch: int,
                          workdir: str | None) -> dict:
  d = tempfile.mkdtemp(prefix="jaxclf-big-", dir=workdir)
  try:
    t = time.perf_counter()
    info = write_big_shards(d, gb, image_px)
    info["write_s"] = round(time.perf_counter() - t, 1)
    log(f"wrote {info['encoded_bytes'] / 1e9:.2f} GB in {info['records']} records; streaming")
    # Drop what we can of the page cache's claim on our own pages: the epoch runs in a new
    # process, so its RSS counts only what streaming needs.
    out = subprocess.run([sys.executable, __file__, "--_stream", d, "--size", str(size),
                          "--threads", str(threads), "--batch", str(batch)],
                         check=True, capture_output=True, text=True)
    res = json.loads(out.stdout)
    res.update({"dataset": info, "encoded_gb": round(info["encoded_bytes"] / 1024 ** 3, 2),
                "ratio_data_over_peak_rss": round(info["encoded_bytes"] / (res["peak_rss_mb"] * 1024 ** 2), 1),
                "output_px": size, "read_threads": threads})
    return res
  finally:
    shutil.rmtree(d, ignore_errors=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=1000)
  p.add_argument("--source-px", type=int, default=256)
  p.add_argument("--sizes", default="64,224")
  p.add_argument("--threads", default="0,1,2")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--larger-than-ram", action="store_true")
  p.add_argument("--gb", type=float, default=4.0)
  p.add_argument("--big-px", type=int, default=1024)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--workdir", default=None, help="where to write temporary data (default: $TMPDIR)")
  p.add_argument("--cases", default="ingest,loader,photo",
                 help="which of ingest, loader, photo to run (comma-separated)")
  p.add_argument("--photo-sizes", default="128,224")
  p.add_argument("--photo-data", default=None,
                 help="an ingested dataset for the photo cases (default: the synthetic one made "
                      "here from --images JPEGs of --source-px)")
  p.add_argument("--_stream", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._stream:
    print(json.dumps(stream_epoch(a._stream, a.size, int(a.threads.split(",")[-1]), a.batch)))
    return
  meta = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
          "python": sys.version.split()[0]}
  if a.larger_than_ram:
    res = bench_larger_than_ram(a.gb, a.big_px, a.size, int(a.threads.split(",")[-1]), a.batch,
                                a.workdir)
    print(json.dumps({"larger_than_ram": res, "meta": meta}, indent=1))
    return
  cases = {c for c in a.cases.split(",") if c}
  if cases - {"ingest", "loader", "photo"}:
    p.error(f"--cases: unknown {sorted(cases - {'ingest', 'loader', 'photo'})}")
  d = tempfile.mkdtemp(prefix="jaxclf-bench-", dir=a.workdir)
  try:
    folder, out = os.path.join(d, "jpegs"), os.path.join(d, "ds")
    res = {}
    if cases & {"ingest", "loader"} or (cases & {"photo"} and not a.photo_data):
      t = time.perf_counter()
      total = make_folder(folder, a.images, a.source_px)
      log(f"made {a.images} JPEGs ({total / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
      if "ingest" in cases:
        res["ingest"] = bench_ingest(folder, out, a.images, a.rounds)
        log(f"ingest: {res['ingest']}")
      else:
        from jaxclf.data import ingest  # noqa: PLC0415
        ingest.ingest(folder, ingest.IngestOptions(out=out, shard_mb=16))
    if "loader" in cases:
      res["loader"] = bench_loader(out, [int(s) for s in a.sizes.split(",")],
                                   [int(t) for t in a.threads.split(",")], a.rounds, a.batch)
    if "photo" in cases:
      res["photo"] = bench_photo(a.photo_data or out, [int(s) for s in a.photo_sizes.split(",")],
                                 a.rounds)
      res["photo"]["source"] = (a.photo_data if a.photo_data else
                                f"synthetic {a.source_px}px q90 JPEGs (train split of --images)")
    print(json.dumps({**res, "meta": {
        **meta, "images": a.images, "source_px": a.source_px, "batch": a.batch,
        "cases": sorted(cases), "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "note": "loader and photo read the train split of the ingested shards (80% of --images)"}},
        indent=1))
  finally:
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
  main()
