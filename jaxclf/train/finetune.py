"""The fine-tuning schedule: a frozen-backbone phase, then everything trains.

`train.freeze_backbone_epochs=K`: steps 1 .. K * steps_per_epoch use their own jitted step
(steps.train_step with `frozen_backbone`): the model in inference mode, so BatchNorm uses and keeps
its running statistics (use_running_average is static in Flax, hence a second step function) and
the backbone's gradients are zeros (the optimizer's `backbone_gate` is 0 too, so weight decay and
momentum leave it bit-identical). After that the ordinary step trains everything. The phase is a
function of the global step alone, so a resumed run picks the right one.

`train.cache_frozen_features`: during that phase the backbone is a fixed function of each image,
so its features are computed once (of the un-augmented image: eval preprocessing) and the head
trains on them: a linear probe whose epochs cost a matrix product. Batches follow the in-memory
path's order (pipeline.epoch_order of (seed, epoch)), so on that path the cached phase trains the
head exactly as the frozen image step does with augmentation off.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxclf.data import device_augment, pipeline
from jaxclf.models import param_groups
from jaxclf.train import inputs

log = logging.getLogger("jaxclf.train")


def frozen_steps(config, steps_per_epoch: int) -> int:
  """The last step of the frozen phase (0: no frozen phase)."""
  return int(config.train.get("freeze_backbone_epochs", 0)) * steps_per_epoch


def backbone_mask(model_name: str, params) -> Any:
  """The params tree with True on every backbone leaf (param_groups: all but the head)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: param_groups.group_of(model_name, p) == "backbone", params)


def single_dense_head(model_name: str, params) -> str:
  """The name of the model's head when it is one Dense layer (kernel + bias), else a ValueError:
  the feature cache computes the head as that layer alone."""
  heads = sorted(k for k in params if param_groups.group_of(model_name, (k,)) == "head")
  if len(heads) != 1 or set(params[heads[0]]) != {"kernel", "bias"} \
      or np.ndim(params[heads[0]]["kernel"]) != 2:
    raise ValueError(f"train.cache_frozen_features: model {model_name!r} has head modules "
                     f"{heads}; the cache needs a head that is one Dense layer (e.g. "
                     "model.kwargs.hidden=() for the CNN), or set it false")
  return heads[0]


def create_head_forward(model, head: str) -> Callable:
  """(params, features) -> logits: the model's own last layer on cached features (same dtype and
  cast as inside the model's __call__)."""
  dtype = getattr(model, "dtype", jnp.float32)

  def forward(params, features):
    kernel = params[head]["kernel"]
    dense = nn.Dense(kernel.shape[-1], dtype=dtype)
    return dense.apply({"params": params[head]}, features).astype(jnp.float32)
  return forward


def create_feature_fn(apply_fn, head: str, prepare=None) -> Callable:
  """jitted (variables, batch) -> the input of the `head` module in inference mode: the
  backbone's features. The head itself is skipped (its call returns zeros)."""
  def fn(variables, batch):
    x = prepare(batch, 0)["image"] if prepare is not None else batch["image"]
    seen = []

    def intercept(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and tuple(context.module.path) == (head,):
        seen.append(args[0])
        return jnp.zeros((args[0].shape[0], variables["params"][head]["kernel"].shape[-1]),
                         args[0].dtype)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      apply_fn(variables, x, train=False)
    if len(seen) != 1:
      raise ValueError(f"the model called its head {head!r} {len(seen)} times; expected once")
    return seen[0]
  return jax.jit(fn)


def compute_features(state, model_name: str, split, spec, batch_size: int, max_pixels: int,
                     read_threads: int) -> tuple[np.ndarray, dict[str, Any]]:
  """Backbone features of every image of `split`, in record order, from the eval
  preprocessing (no augmentation). -> (features [N, D] float32, a record for run.json)."""
  t0 = time.time()
  head = single_dense_head(model_name, state.params)
  on_device = pipeline.in_memory_pixels(split, spec) is not None
  prepare = device_augment.make_prepare_fn(spec, None, None) if on_device else None
  fn = create_feature_fn(state.apply_fn, head, prepare)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  n = len(split.labels)
  chunks = []
  for batch in inputs.eval_batches(split, spec, batch_size, on_device=on_device,
                                   max_pixels=max_pixels, read_threads=read_threads):
    chunks.append(np.asarray(fn(variables, {"image": batch["image"]}), np.float32))
  features = np.concatenate(chunks)[:n]  # the last batch is padded
  seconds = time.time() - t0
  log.info("feature cache: %d train images -> %d features each in %.1f s (un-augmented, "
           "inference mode)", n, features.shape[1], seconds)
  return features, {"images": n, "dim": int(features.shape[1]), "seconds": round(seconds, 2),
                    "head": head, "augmented": False}


def cached_batches(features: np.ndarray, labels: np.ndarray, *, start: int, end: int,
                   steps_per_epoch: int, batch_size: int, seed: int,
                   sampler: str) -> Iterator[dict[str, np.ndarray]]:
  """Batches of global steps start+1 .. end from the cache, in pipeline.epoch_order."""
  labels = np.asarray(labels)
  order, order_epoch = None, None
  for step in range(start, end):
    epoch, b = divmod(step, steps_per_epoch)
    if epoch != order_epoch:
      order, order_epoch = pipeline.epoch_order(labels, epoch=epoch, seed=seed,
                                                sampler=sampler), epoch
    idx = order[b * batch_size:(b + 1) * batch_size]
    yield {"features": features[idx], "label": labels[idx].astype(np.int32)}


class Phases:
  """Which jitted step and which batches train global step s: the frozen phase's (images or the
  feature cache) for s <= frozen_end, the ordinary ones after."""

  def __init__(self, train_step, frozen_step=None, frozen_end: int = 0, cached=None):
    self.train_step, self.frozen_step = train_step, frozen_step
    self.frozen_end, self.cached = frozen_end, cached

  def image_start(self, start: int) -> int:
    """Where the image stream starts: after the cached phase, when there is one."""
    return max(start, self.frozen_end) if self.cached is not None else start

  def at(self, step: int, images):
    if step <= self.frozen_end:
      return self.frozen_step, (self.cached if self.cached is not None else images)
    return self.train_step, images
