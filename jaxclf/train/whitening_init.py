"""Fits the CNN's patch-whitening stem (model.kwargs.stem='whiten', jaxclf/models/whitening.py)
at a fresh start. A resumed run restores the fitted filters from its checkpoint, and a run from
model.pretrained keeps the loaded ones, so neither calls this."""
from __future__ import annotations

import logging

import jax
import numpy as np

from jaxclf.data import pipeline, transforms
from jaxclf.models import whitening
from jaxclf.train import ema as ema_lib
from jaxclf.train import inputs

log = logging.getLogger("jaxclf.train")
SAMPLE_SIZE = 5000  # images: ~3.6M 2x2 patches at 28 px, a covariance good to ~1e-3


def training_sample(split, spec, config, n: int = SAMPLE_SIZE) -> np.ndarray:
  """The first `n` training images (record order, deterministic), normalised as the model sees
  them without augmentation: from the in-memory array when there is one, else decoded by Grain
  (undecodable records are left out)."""
  pixels = pipeline.in_memory_pixels(split, spec)
  if pixels is not None:
    return transforms.normalize(pixels[:n], spec)
  out, have = [], 0
  for batch in inputs.eval_batches(split, spec, 256, on_device=False,
                                   max_pixels=int(config.data.max_pixels),
                                   read_threads=int(config.data.read_threads)):
    rows = batch["image"][batch["label"] >= 0][:n - have]
    out.append(rows)
    have += len(rows)
    if have >= n:
      break
  return np.concatenate(out)


def fit_stem(config, state, split, spec):
  """`state` with its whitening filters fitted to the training sample (and its weight average,
  if any, restarted from them); unchanged when the model has no whitening stem."""
  if (config.model.get("kwargs") or {}).get("stem") != "whiten":
    return state
  kwargs = config.model.kwargs
  images = training_sample(split, spec, config)
  filters = whitening.fit_whitening(images, int(kwargs.get("whiten_kernel", 2)),
                                    float(kwargs.get("whiten_eps", 5e-4)))
  if jax.process_count() > 1:
    # Every process fits on the same images, but an eigenvector's sign (and so the filters'
    # order) may differ between CPUs' LAPACK builds: all processes take process 0's filters.
    from jax.experimental import multihost_utils
    filters = np.asarray(multihost_utils.broadcast_one_to_all(filters))
  log.info("whitening stem fitted on %d training images: %d filters", len(images),
           filters.shape[-1])
  state = state.replace(params=whitening.set_filters(state.params, filters))
  return ema_lib.start(state) if state.ema is not None else state
