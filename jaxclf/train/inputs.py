"""Where the trainer's batches come from, and what the jitted step does to them first.

Two paths, chosen by `data.on_device` ('auto' picks the first whenever it applies):
  in memory  the split's decoded uint8 pixels are one array at the model's input size: batches are
             gathered by index (order from (seed, epoch)), shipped as uint8, and normalised and
             augmented inside the jitted step (`device_augment.make_prepare_fn`). Resuming needs
             only the step. On 2 cores this frees the core that the per-example host map used.
  Grain      everything else (encoded files, ingested shards, host-only augmentations): per-epoch
             Grain pipelines with per-example transforms, resumed from the iterator state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np

from jaxclf.data import device_augment, pipeline, transforms
from jaxclf.data.types import DataError, Split
from jaxclf.train import distributed


def use_device_path(setting: str, split: Split, spec: transforms.PreprocessSpec,
                    aug: transforms.AugmentSpec | None) -> bool:
  setting = str(setting).lower()
  fits = pipeline.in_memory_pixels(split, spec) is not None
  supported = aug is None or device_augment.supports(aug)
  if setting == "false":
    return False
  if setting == "true" and not (fits and supported):
    why = ("its pixels are not one in-memory uint8 array at the model's input size" if not fits
           else "augment.random_resized_crop/brightness/contrast/saturation run on the host only")
    raise DataError(f"data.on_device=true: the train split cannot be augmented on the device: "
                    f"{why}; use data.on_device=auto")
  return fits and supported


@dataclasses.dataclass
class TrainInput:
  split: Split
  spec: transforms.PreprocessSpec
  aug: transforms.AugmentSpec
  batch_size: int
  steps_per_epoch: int
  seed: int
  sampler: str
  on_device: bool
  grain_transform: Any = None  # pipeline.TrainTransform for the Grain path
  read_threads: int = 1
  prefetch: int = 8
  worker_processes: int = 0
  # Multi-process: every process draws the same global order and reads only its rows of each
  # global batch of `batch_size` (distributed.local_rows): batches here are local ones.
  process_index: int = 0
  process_count: int = 1

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def prepare_fn(self, key) -> Callable | None:
    """The step's `prepare` hook: the device path's augmentation; on the Grain path, whose
    batches arrive augmented, only Mixup/CutMix (None when off)."""
    if self.on_device:
      return device_augment.make_prepare_fn(self.spec, self.aug, key, seed=self.seed)
    return device_augment.make_mix_fn(self.aug, key)

  def epoch_batches(self, epoch: int, step: int, iter_state) -> Iterator[dict[str, np.ndarray]]:
    """The batches of `epoch` from global `step` on (mid-epoch resume)."""
    p, n = self.process_index, self.process_count
    if self.on_device:
      labels = self.split.labels
      order = pipeline.epoch_order(labels, epoch=epoch, seed=self.seed, sampler=self.sampler)
      if n > 1:
        order = distributed.process_order(order, self.batch_size, p, n)
      # augment.hflip_mode=alternate: the rows' flips from their global index and the epoch
      flips = (transforms.alternate_hflips(self.seed, order, epoch)
               if self.aug is not None and self.aug.alternating_hflip else None)
      return pipeline.array_batches(pipeline.in_memory_pixels(self.split, self.spec),
                                    np.asarray(labels), order, self.local_batch_size,
                                    start=step - epoch * self.steps_per_epoch, hflip=flips)
    ds = pipeline.train_dataset(self.split, epoch=epoch, seed=self.seed,
                                batch_size=self.local_batch_size, transform=self.grain_transform,
                                sampler=self.sampler, process_count=n)
    if n > 1:  # local batch p, p+n, ... of the one shuffled order: its rows of each global batch
      ds = ds[:self.steps_per_epoch * n][p::n]
    it = pipeline.to_iterator(ds, self.read_threads, self.prefetch, self.worker_processes)
    if iter_state is not None:
      it.set_state(iter_state)
    return it

  @staticmethod
  def iterator_state(it) -> Any:
    """What a checkpoint must keep to resume mid-epoch (None: the step says it all)."""
    return it.get_state() if hasattr(it, "get_state") else None

  def stream(self, start: int, end: int, saved_epoch: int | None, saved_state) -> "StepBatches":
    return StepBatches(self, start, end, saved_epoch, saved_state)

  def preview(self, batch, key, step) -> np.ndarray:
    """uint8 images of a batch as the model sees them (for the TensorBoard grid): the step's own
    `prepare` (augmentation, erasing, mixing) of the whole batch, keyed by its step."""
    prepare = self.prepare_fn(key)
    if prepare is not None:
      batch = jax.jit(prepare)({k: batch[k] for k in ("image", "label", "hflip") if k in batch},
                               step)
    return transforms.denormalize(np.asarray(batch["image"][:32]), self.spec)


class StepBatches:
  """The batches of global steps start+1 .. end, epoch after epoch: the flat loop's one input.
  With several processes each batch is this process's rows of the global batch (the loop builds
  the global array from them, distributed.assemble)."""

  def __init__(self, train_input: TrainInput, start: int, end: int, saved_epoch: int | None,
               saved_state):
    self.ti, self.start, self.end = train_input, start, end
    self.epoch, self.it = saved_epoch, None
    self.saved_state = saved_state if saved_epoch == start // train_input.steps_per_epoch else None
    self._gen = self._batches()

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._gen)

  def _batches(self):
    spe, step = self.ti.steps_per_epoch, self.start
    while step < self.end:
      epoch = step // spe
      self.epoch, self.it = epoch, self.ti.epoch_batches(epoch, step, self.saved_state)
      self.saved_state = None
      for batch in self.it:
        yield batch
        step += 1
        if step >= self.end or step % spe == 0:
          break
      if step < self.end and step % spe:
        raise DataError(f"epoch {epoch} ended after {step - epoch * spe} of its {spe} batches")

  def iterator_state(self) -> tuple[int | None, Any]:
    """(epoch, iterator state) of the position after the last batch taken (for checkpoints)."""
    if self.it is None:
      return self.epoch, self.saved_state
    return self.epoch, self.ti.iterator_state(self.it)


def eval_batches(split: Split, spec: transforms.PreprocessSpec, batch_size: int, *,
                 on_device: bool, max_pixels: int, read_threads: int,
                 failures=None) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `split` once, in padded batches: uint8 (device path) or model input."""
  if on_device:
    return pipeline.array_eval_batches(pipeline.in_memory_pixels(split, spec),
                                       np.asarray(split.labels), batch_size)
  ds = pipeline.eval_dataset(split, batch_size=batch_size,
                             transform=pipeline.EvalTransform(spec, max_pixels, failures))
  return (pipeline.pad_batch(b, batch_size) for b in pipeline.to_iterator(ds, read_threads, 4))
