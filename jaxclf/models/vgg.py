"""VGG-11/16 with BatchNorm. Pools are skipped once the map is 1 px, so 28x28 inputs work;
the classifier is global-average-pool + dropout + dense instead of the 4096-wide FC stack,
which would be 120M parameters for little gain on small images."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxclf.models.layers import BatchNorm, Conv, max_pool_2x2
from jaxclf.models.registry import register_model

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
  num_classes: int
  layers: Sequence[Any] = VGG11
  width: float = 1.0  # multiplies every conv width
  dropout: float = 0.5
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # CPU kernels of conv, BN and pool (layers.py); the trainer picks it
  features_only: bool = False  # return the last pool's NHWC map (torchvision's `features` output)

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, relu=True, impl=self.conv_impl)
    x = x.astype(self.dtype)
    for spec in self.layers:
      if spec == "M":
        if min(x.shape[1:3]) >= 2:
          x = max_pool_2x2(x, self.conv_impl)  # = nn.max_pool 2x2/2 VALID, faster on CPU
      else:
        x = Conv(max(1, int(spec * self.width)), (3, 3), use_bias=False, dtype=self.dtype,
                 impl=self.conv_impl)(x)
        x = norm()(x)  # conv-BN-ReLU
    if self.features_only:
      return x.astype(jnp.float32)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


register_model("vgg11", partial(VGG, layers=VGG11))
register_model("vgg16", partial(VGG, layers=VGG16))
register_model("vgg_tiny", partial(VGG, layers=VGG11, width=1 / 16, dropout=0.0))
