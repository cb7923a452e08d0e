"""TrainState with BatchNorm statistics and a learning-rate multiplier (reduce-on-plateau)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

from jaxclf.train import ema as ema_lib


class TrainState(train_state.TrainState):
  batch_stats: Any
  lr_scale: jax.Array
  # precision.DynamicLossScale for float16 compute, else None. Checkpoints written before this
  # field existed lack it; orbax refuses such a tree mismatch, so checkpoints.restore_state
  # restores the fields present and leaves this one None (tests/test_train.py's old fixture).
  loss_scale: Any = None
  # train.ema: {'params', 'batch_stats'} averaged over training (jaxclf/train/ema.py), else None.
  # A checkpoint without it restores as loss_scale's does.
  ema: Any = None


def create_train_state(rng: jax.Array, model: nn.Module, input_shape, tx,
                       loss_scale=None, ema: bool = False) -> TrainState:
  """`ema`: keep a weight average (train.ema on), starting from these initial weights."""
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *input_shape), jnp.float32),
                                           train=False))(rng)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}),
                            lr_scale=jnp.ones((), jnp.float32), loss_scale=loss_scale)
  return ema_lib.start(state) if ema else state


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
