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


class CNN(nn.Module):
  num_classes: int
  layers: Sequence[Any] = (32, 32, "M", 64, 64, "M", 128, "M")
  hidden: Sequence[int] = ()  # widths of dense layers before the classifier
  dropout: float = 0.2
  global_pool: str = "flatten"  # 'flatten' | 'avg'
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # CPU kernels of conv, BN and pool (layers.py); the trainer picks it

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, relu=True, impl=self.conv_impl)
    x = x.astype(self.dtype)
    for i, spec in enumerate(self.layers):
      if spec == "M":
        x = max_pool_2x2(x, self.conv_impl)
      else:
        if i == 0 and x.shape[-1] <= 4:  # few input channels: patches @ kernel is faster on CPU
          x = StemConv(int(spec), dtype=self.dtype, impl=self.conv_impl)(x)
        else:
          x = Conv(int(spec), (3, 3), use_bias=False, dtype=self.dtype, impl=self.conv_impl)(x)
        x = norm()(x)  # conv-BN-ReLU
    x = x.mean(axis=(1, 2)) if self.global_pool == "avg" else x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


register_model("cnn", CNN)
register_model("cnn_tiny", partial(CNN, layers=(8, "M", 16, "M"), dropout=0.0))
