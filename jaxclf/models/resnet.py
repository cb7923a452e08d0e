"""ResNet v1.5 (after flax examples/imagenet), with a small-input stem for 28-64 px images.

`stem='imagenet'` is the 7x7/2 conv + 3x3/2 max pool; `stem='small'` is one 3x3/1 conv and no pool,
which keeps 28x28 inputs from collapsing to 1x1 before the last stage.

Padding is torchvision's, symmetric: 1/1 for every 3x3 conv and the stem max pool, 3/3 for the 7x7
stem, 0 for the 1x1 convs. Flax's 'SAME' pads 0/1 for a stride-2 3x3 on an even size, which shifts
every downsampled map by half a pixel, so torchvision weights (`jaxclf weights convert`) would
not reproduce their logits.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxclf.models.layers import BatchNorm, Conv
from jaxclf.models.registry import register_model

ModuleDef = Any
PAD_3X3 = ((1, 1), (1, 1))  # torchvision's padding=1, also for stride 2 (see the docstring)


class ResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=PAD_3X3)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=PAD_3X3)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=PAD_3X3)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


def max_pool_3x3_s2(x):
  """torchvision's MaxPool2d(3, 2, padding=1): -inf padding 1/1, then a VALID pool. An explicit
  pad, because jax2onnx exports nn.max_pool's own explicit padding wrongly (max |Δlogit| 0.27
  on a ResNet-18; the pad-then-VALID form matches to 1e-7)."""
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


class ResNet(nn.Module):
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = ResNetBlock
  num_filters: int = 64
  stem: str = "small"  # 'small' | 'imagenet'
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv_impl: str = "xla"  # CPU kernels of conv and BN (layers.py); the trainer picks it

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = partial(Conv, use_bias=False, dtype=self.dtype, impl=self.conv_impl)
    norm = partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, impl=self.conv_impl)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
      x = self.act(norm(name="bn_init")(x))
      x = max_pool_3x3_s2(x)
    else:
      x = conv(self.num_filters, (3, 3), padding=PAD_3X3, name="conv_init")(x)
      x = self.act(norm(name="bn_init")(x))
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm,
                           act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)
ResNetTiny = partial(ResNet, stage_sizes=(1, 1), block_cls=ResNetBlock, num_filters=8)

register_model("resnet18", ResNet18)
register_model("resnet34", ResNet34)
register_model("resnet50", ResNet50)
register_model("resnet_tiny", ResNetTiny)
