"""Grain input pipelines: decode -> transforms -> batches, one per epoch, each fully determined
by (seed, epoch), so an iterator state saved mid-epoch resumes exactly.

Why per-epoch pipelines instead of `repeat()`: epochs are where evaluation, checkpoints and the
balanced sampler's redraw happen, and a per-epoch iterator's state is small ({next index}).
Read threads (not processes) by default: on 2 cores they measured faster.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterator

import grain
import numpy as np

from jaxclf.data import autoaugment, transforms
from jaxclf.data.decode import DecodeError, decode_image
from jaxclf.data.types import ArraySource, Split


class DecodeFailures:
  """Thread-safe record of records that failed to decode inside the pipeline (reported, not fatal)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.items: list[dict[str, Any]] = []

  def add(self, err: DecodeError, index: int | None = None) -> None:
    with self._lock:
      if len(self.items) < 1000:
        self.items.append({**err.as_dict(), "index": index})


def _pixels(record, channels, max_pixels, failures: DecodeFailures | None, spec):
  image = record["image"]
  if isinstance(image, (bytes, bytearray, memoryview)):
    try:
      return decode_image(bytes(image), channels, max_pixels=max_pixels,
                          target_size=spec.image_size, source=record.get("uri")), True
    except DecodeError as e:
      if failures is not None:
        failures.add(e)
      # Keep the batch shape; the example is masked out of loss and metrics (label -> -1).
      return np.zeros(spec.input_shape, np.uint8), False
  return np.asarray(image), True


@dataclasses.dataclass
class TrainTransform:
  spec: transforms.PreprocessSpec
  aug: transforms.AugmentSpec
  max_pixels: int
  failures: DecodeFailures | None = None

  def __call__(self, record, rng: np.random.Generator):
    img, ok = _pixels(record, self.spec.channels, self.max_pixels, self.failures, self.spec)
    img = transforms.augment(img, rng, self.spec, self.aug, record.get(HFLIP_KEY))
    if self.aug.auto:  # the ops of this example's (seed, step, row), as on the device
      img = autoaugment.augment_example(img, self.aug, self.spec, *record[EXAMPLE_KEY])
    x = transforms.normalize(img, self.spec)
    if self.aug.random_erasing:
      x = transforms.random_erase(x, rng, self.aug)
    return {"image": x, "label": np.int32(record["label"] if ok else -1)}


EXAMPLE_KEY = "_example"  # (seed, step, row): where an example lands in training (auto-augment)


@dataclasses.dataclass(frozen=True)
class _Position:
  """Tags each record with the (seed, global step, row of the global batch) it trains at, from its
  position in the epoch's (shuffled, per-process) order: the key of the auto-augment draw that
  the device path computes from the step and the row."""
  seed: int
  first_step: int
  batch_size: int  # per process
  process_count: int

  def __call__(self, position: int, record):
    local_batch, row = divmod(int(position), self.batch_size)
    # Process p reads local batches p, p + n, ... (inputs.TrainInput): global step k holds
    # local batch k * n + p, whose rows are p's block of the global batch.
    step = self.first_step + local_batch // self.process_count
    global_row = (local_batch % self.process_count) * self.batch_size + row
    return {**record, EXAMPLE_KEY: (self.seed, step, global_row)}


HFLIP_KEY = "_hflip"  # augment.hflip_mode=alternate: the example's flip in this epoch


@dataclasses.dataclass(frozen=True)
class _AlternateFlip:
  """Tags each record, before the shuffle, with `transforms.alternate_hflips` of its index in
  the training split (`ids[position]` under the balanced sampler's draw) and the epoch."""
  seed: int
  epoch: int
  ids: np.ndarray | None = None

  def __call__(self, position: int, record):
    index = position if self.ids is None else self.ids[position]
    return {**record, HFLIP_KEY: bool(transforms.alternate_hflips(self.seed, index, self.epoch))}


@dataclasses.dataclass
class EvalTransform:
  spec: transforms.PreprocessSpec
  max_pixels: int
  failures: DecodeFailures | None = None

  def __call__(self, record):
    img, ok = _pixels(record, self.spec.channels, self.max_pixels, self.failures, self.spec)
    return {"image": transforms.preprocess(img, self.spec),
            "label": np.int32(record["label"] if ok else -1)}


class _Indexed:
  """A view of `source` through an index array (balanced sampling draws with replacement)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def balanced_indices(labels: np.ndarray, seed: int) -> np.ndarray:
  """A class-balanced draw with replacement, as many as there are labels."""
  w = 1.0 / np.bincount(labels)[labels]
  return np.random.default_rng(seed).choice(len(labels), len(labels), p=w / w.sum())


def train_dataset(split: Split, *, epoch: int, seed: int, batch_size: int,
                  transform: TrainTransform, sampler: str = "shuffle",
                  shard_index: int = 0, shard_count: int = 1,
                  process_count: int = 1) -> grain.MapDataset:
  """The batched MapDataset of one epoch (drop_remainder: every step sees a full batch).
  `batch_size` is per process; with `process_count` processes, inputs.TrainInput deals the
  batches round-robin (only auto-augment's per-example key depends on it)."""
  s = epoch_seed(seed, epoch)
  source, ids = split.source, None
  if sampler == "balanced":
    ids = balanced_indices(split.labels, s)
    source = _Indexed(source, ids)
  ds = grain.MapDataset.source(source)
  if transform.aug.alternating_hflip:
    ds = ds.map_with_index(_AlternateFlip(seed, epoch, ids))
  ds = ds.seed(s).shuffle()
  if shard_count > 1:  # one slice per JAX process (multi-host data parallelism)
    ds = ds[shard_index::shard_count]
  if transform.aug.auto:
    steps_per_epoch = len(source) // (batch_size * process_count)
    ds = ds.map_with_index(_Position(seed, epoch * steps_per_epoch, batch_size, process_count))
  return ds.random_map(transform).batch(batch_size, drop_remainder=True)


def eval_dataset(split: Split, *, batch_size: int, transform: EvalTransform) -> grain.MapDataset:
  return grain.MapDataset.source(split.source).map(transform).batch(batch_size)


def to_iterator(ds: grain.MapDataset, threads: int, prefetch: int, worker_processes: int = 0
                ) -> grain.DatasetIterator:
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  if worker_processes > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_processes))
  return iter(it_ds)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short final eval batch to `size` (label -1 = ignored) so one compiled shape serves all."""
  n = len(batch["label"])
  if n == size:
    return batch
  return {"image": np.concatenate([batch["image"], np.zeros((size - n, *batch["image"].shape[1:]),
                                                            batch["image"].dtype)]),
          "label": np.concatenate([batch["label"], np.full(size - n, -1, np.int32)])}


# ----------------------------------------------------------------------------- in-memory batches
# For splits whose decoded pixels are one uint8 array at the model's input size: batches are
# gathered by index on the host (microseconds) and normalised/augmented on the device
# (jaxclf/data/device_augment.py). The position in an epoch is the step itself, so resuming needs
# no iterator state.

def in_memory_pixels(split: Split, spec: transforms.PreprocessSpec) -> np.ndarray | None:
  """The split's uint8 NHWC pixels if they are in memory and need no resize/crop, else None."""
  src = split.source
  if not isinstance(src, ArraySource):
    return None
  images = src.images
  if (images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != spec.input_shape
      or spec.crop_fraction != 1.0):
    return None
  return images


def epoch_order(labels: np.ndarray, *, epoch: int, seed: int, sampler: str = "shuffle"
                ) -> np.ndarray:
  """The record order of one training epoch, fully determined by (seed, epoch)."""
  s = epoch_seed(seed, epoch)
  idx = balanced_indices(labels, s) if sampler == "balanced" else np.arange(len(labels))
  return idx[np.random.default_rng(s).permutation(len(idx))]


def array_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int,
                  start: int = 0, hflip: np.ndarray | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Full training batches of `order` from batch number `start` on (drop_remainder); `hflip`
  (one flag per position of `order`, augment.hflip_mode=alternate) rides along as 'hflip'."""
  for b in range(start, len(order) // batch_size):
    rows = slice(b * batch_size, (b + 1) * batch_size)
    idx = order[rows]
    batch = {"image": images[idx], "label": labels[idx].astype(np.int32)}
    if hflip is not None:
      batch["hflip"] = hflip[rows]
    yield batch


def array_eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order; the last batch padded (label -1) to `batch_size`."""
  for i in range(0, len(labels), batch_size):
    yield pad_batch({"image": images[i:i + batch_size],
                     "label": labels[i:i + batch_size].astype(np.int32)}, batch_size)
