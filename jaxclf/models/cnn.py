"""A configurable VGG-style CNN, the default for small images such as Fashion-MNIST.

`layers` reads like a VGG table: ints are 3x3 conv-BN-ReLU widths, 'M' a 2x2 max pool.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxclf.models.layers import BatchNorm, Conv, StemConv, max_pool_2x2
from jaxclf.models.registry import register_model

# Kernel initialisers by name. 'torch' is PyTorch's default for Conv2d and Linear
# (kaiming_uniform with a=sqrt(5): U(+-1/sqrt(fan_in)), a third of lecun_normal's variance), so a
# net ported from PyTorch starts where it did: with BatchNorm after each conv the init scale sets
# the effective learning rate (gradients scale as 1/|w|), and configs/cnn.py's weight decay cannot
# undo it in 10 epochs (lr x wd summed over the schedule is 0.11: at most about a 10% shrink).
KERNEL_INITS = {
    "lecun": nn.initializers.lecun_normal(),
    "torch": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}


class CNN(nn.Module):
  num_classes: int
  layers: Sequence[Any] = (32, 32, "M", 64, 64, "M", 128, "M")
  hidden: Sequence[int] = ()  # widths of dense layers before the classifier
  dropout: float = 0.2
  global_pool: str = "flatten"  # 'flatten' | 'avg'
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # CPU kernels of conv, BN and pool (layers.py); the trainer picks it
  weight_init: str = "lecun"  # kernel initialiser: a KERNEL_INITS name

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.weight_init not in KERNEL_INITS:
      raise ValueError(f"model.kwargs.weight_init={self.weight_init!r}: use one of "
                       f"{sorted(KERNEL_INITS)}")
    k_init = KERNEL_INITS[self.weight_init]
    norm = partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, relu=True, impl=self.conv_impl)
    x = x.astype(self.dtype)
    for i, spec in enumerate(self.layers):
      if spec == "M":
        x = max_pool_2x2(x, self.conv_impl)
      else:
        if i == 0 and x.shape[-1] <= 4:  # few input channels: patches @ kernel is faster on CPU
          x = StemConv(int(spec), dtype=self.dtype, impl=self.conv_impl, kernel_init=k_init)(x)
        else:
          x = Conv(int(spec), (3, 3), use_bias=False, dtype=self.dtype, impl=self.conv_impl,
                   kernel_init=k_init)(x)
        x = norm()(x)  # conv-BN-ReLU
    x = x.mean(axis=(1, 2)) if self.global_pool == "avg" else x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=k_init)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=k_init)(x).astype(jnp.float32)


register_model("cnn", CNN)
register_model("cnn_tiny", partial(CNN, layers=(8, "M", 16, "M"), dropout=0.0))
