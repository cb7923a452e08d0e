"""TrainState with BatchNorm statistics and a learning-rate multiplier (reduce-on-plateau)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any
  lr_scale: jax.Array
  # precision.DynamicLossScale for float16 compute, else None. Checkpoints written before this
  # field existed lack it; orbax refuses such a tree mismatch, so checkpoints.restore_state
  # restores the fields present and leaves this one None (tests/test_train.py's old fixture).
  loss_scale: Any = None


def create_train_state(rng: jax.Array, model: nn.Module, input_shape, tx,
                       loss_scale=None) -> TrainState:
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *input_shape), jnp.float32),
                                           train=False))(rng)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}),
                           lr_scale=jnp.ones((), jnp.float32), loss_scale=loss_scale)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
