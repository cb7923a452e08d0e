"""Mixed precision: the compute dtype is `model.dtype` (float32 | bfloat16 | float16); params,
optimizer state and BatchNorm statistics stay float32 (the models cast activations, not weights,
and keep their statistics in float32). float16's narrow range needs loss scaling: a dynamic scale
in the style of jmp's DynamicLossScale (dm-jmp), carried in the TrainState and checkpointed with it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@struct.dataclass
class DynamicLossScale:
  """Multiply the loss by `scale` before differentiating; after each step halve the scale on
  non-finite gradients (the update is skipped), double it after `period` finite steps in a row."""
  scale: jax.Array
  counter: jax.Array
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_scale: float = struct.field(pytree_node=False, default=1.0)

  @classmethod
  def create(cls, initial: float = 2.0 ** 15, period: int = 2000) -> "DynamicLossScale":
    return cls(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period=period)

  def scale_loss(self, loss):
    return loss * self.scale.astype(loss.dtype)

  def unscale(self, grads):
    inv = 1.0 / self.scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

  def adjust(self, finite: jax.Array) -> "DynamicLossScale":
    grow = finite & (self.counter + 1 >= self.period)
    scale = jnp.where(finite, jnp.where(grow, self.scale * self.factor, self.scale),
                      jnp.maximum(self.scale / self.factor, self.min_scale))
    counter = jnp.where(finite & ~grow, self.counter + 1, 0)
    return self.replace(scale=scale, counter=counter)


def compute_dtype(name: str):
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model.dtype={name!r}: use one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def create_loss_scale(dtype_name: str) -> DynamicLossScale | None:
  """float16 gets a dynamic loss scale; float32 and bfloat16 (float32's range) need none."""
  return DynamicLossScale.create() if dtype_name == "float16" else None
