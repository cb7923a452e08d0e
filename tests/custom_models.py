"""Custom architectures given by import path (`model.name=tests.custom_models:Name`)."""
import flax.linen as nn
import jax.numpy as jnp


class NaNAfterInit(nn.Module):
  """Produces NaN logits in training mode: exercises the trainer's fail-fast check."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    logits = nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
    return logits * jnp.nan if train else logits
