"""EfficientNet-B0 and EfficientNet-Lite0 (Tan & Le 2019), layer for layer as lukemelas
`efficientnet_pytorch` 0.7.1 and its Lite fork `efficientnet_lite_pytorch` 0.1.0 build them, so
their ImageNet weights load into this module (jaxclf/models/pretrained.py).

What follows the reference exactly:
  - every conv uses TF "SAME" padding (output = ceil(input / stride); the odd pixel of padding goes
    after, not before). Flax's padding="SAME" computes it the same way as the reference's
    Conv2dStaticSamePadding, so no manual padding is needed at any input size;
  - BatchNorm epsilon 1e-3 (the pretrained running statistics were computed with it);
  - width scaling rounds channels to multiples of 8 (`round_filters`), depth scaling takes the ceil of
    repeats (`round_repeats`);
  - Lite: no squeeze-excite, relu6 instead of swish, stem (32) and head (1280) not scaled, and the
    first and last stage keep their repeat counts;
  - stochastic depth ("drop connect") grows linearly with the block index: rate * i / num_blocks.

Small inputs work: with SAME padding the five stride-2 stages take 28x28 to 14, 7, 4, 2, 1.
Stochastic depth and dropout draw from the 'dropout' rng collection, like every other model here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclf.models.layers import BatchNorm, Conv, resolve_conv_impl
from jaxclf.models.registry import register_model

ModuleDef = Any


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One row of the EfficientNet table: `repeats` MBConv blocks; only the first one strides."""
  repeats: int
  kernel: int
  stride: int
  expand: int
  features: int  # output channels before width scaling


# (repeats, kernel, stride, expand ratio, output channels), the B0 table of the paper, shared by Lite0.
B0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)

BN_EPSILON = 1e-3

# TF EfficientNet initialisation: normal with variance 2 / fan_out. For a depthwise kernel TF's fan_out
# is k*k, which is Flax's fan_in of the (k, k, 1, C) kernel.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def round_filters(features: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by `width` and rounds to a multiple of `divisor`, never down by >10%."""
  if width == 1.0:
    return features
  scaled = features * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


# 'auto': the model's conv_impl decides (oneDNN's depthwise primitive when it resolves to
# 'onednn', taps elsewhere on CPU, XLA's grouped convolution off CPU); 'onednn' | 'taps' | 'xla'
# force one (read at trace time; bench/lite0_step.py times them in one run; JAXCLF_DEPTHWISE_IMPL
# sets it for a benchmark's child process).
DEPTHWISE_IMPL = os.environ.get("JAXCLF_DEPTHWISE_IMPL", "auto")
DEPTHWISE_IMPLS = ("auto", "onednn", "taps", "xla")


@contextlib.contextmanager
def depthwise_impl(impl: str) -> Iterator[None]:
  """Traces DepthwiseConv with `impl` ("auto" | "onednn" | "taps" | "xla") inside the block. ONNX
  export uses "xla": the graph then holds one grouped conv per layer, which onnxruntime runs
  natively (the oneDNN call and the taps are levers for the CPU training step only)."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise impl {impl!r}: expected one of {', '.join(DEPTHWISE_IMPLS)}")
  global DEPTHWISE_IMPL
  saved, DEPTHWISE_IMPL = DEPTHWISE_IMPL, impl
  try:
    yield
  finally:
    DEPTHWISE_IMPL = saved


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
  """XLA's 'SAME' padding of one spatial axis (the larger half after), as nn.Conv pads."""
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def depthwise_taps(x, kernel, stride: int):
  """A depthwise 'SAME' convolution as k*k shifted multiply-adds: out = sum over taps of the
  strided input window times that tap's per-channel weight. Same maths as lax's grouped conv;
  on XLA CPU about 6x faster forward + backward on Lite0's shapes (bench/lite0_step.py), where
  grouped convolutions take ~70% of the train step."""
  k = kernel.shape[0]
  (t, b), (l, r) = _same_pads(x.shape[1], k, stride), _same_pads(x.shape[2], k, stride)
  xp = jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
  oh, ow = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  out = None
  for i in range(k):
    for j in range(k):
      window = xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride, :]
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


# BatchNorm's training pass: 'auto' follows the model's conv_impl (oneDNN's primitive when it
# resolves to 'onednn'); 'xla' keeps layers.BatchNorm's XLA arithmetic (read at trace time, for
# bench/lite0_step.py's A/B; JAXCLF_EFFICIENTNET_BN for a benchmark's child process).
BATCHNORM_IMPL = os.environ.get("JAXCLF_EFFICIENTNET_BN", "auto")


def resolve_depthwise_impl(conv_impl: str) -> str:
  """What DepthwiseConv runs for a model whose conv_impl is `conv_impl` (see DEPTHWISE_IMPL)."""
  if DEPTHWISE_IMPL != "auto":
    return DEPTHWISE_IMPL
  if jax.default_backend() != "cpu":
    return "xla"
  return "onednn" if resolve_conv_impl(conv_impl) == "onednn" else "taps"


class DepthwiseConv(nn.Module):
  """nn.Conv(C, (k, k), stride, 'SAME', feature_group_count=C, use_bias=False) with the same
  parameter ('kernel', (k, k, 1, C)), so checkpoints and the ImageNet weights load unchanged.
  On CPU it runs oneDNN's depthwise primitive (impl 'onednn', forward and both gradients) or
  k*k taps (`depthwise_taps`); elsewhere XLA's grouped convolution (`resolve_depthwise_impl`)."""
  kernel_size: int
  stride: int
  kernel_init: Callable = depthwise_init
  dtype: Any = jnp.float32
  impl: str = "xla"  # the model's conv_impl

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, c))
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    impl = resolve_depthwise_impl(self.impl)
    if impl == "taps":
      return depthwise_taps(x, kernel, self.stride)
    if impl == "onednn" and x.dtype == jnp.float32:
      from jaxclf.ops import onednn
      return onednn.conv2d(x, kernel, strides=(self.stride, self.stride), padding="SAME",
                           groups=c)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), "SAME", feature_group_count=c,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class MBConv(nn.Module):
  """Inverted bottleneck: [expand 1x1] -> depthwise kxk -> [squeeze-excite] -> project 1x1 (+ skip)."""
  features: int
  kernel: int
  stride: int
  expand: int
  se_ratio: Optional[float]
  drop_rate: float
  norm: ModuleDef
  act: Callable
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    inputs = x
    in_features = x.shape[-1]
    hidden = in_features * self.expand
    conv1x1 = partial(Conv, kernel_size=(1, 1), use_bias=False, kernel_init=conv_init,
                      dtype=x.dtype, impl=self.conv_impl)
    if self.expand != 1:
      x = conv1x1(hidden, name="expand_conv")(x)
      x = self.act(self.norm(name="expand_bn")(x))
    x = DepthwiseConv(self.kernel, self.stride, dtype=x.dtype, impl=self.conv_impl,
                      name="depthwise_conv")(x)
    x = self.act(self.norm(name="depthwise_bn")(x))
    if self.se_ratio:
      # The squeeze width comes from the block's *input* channels, as in the paper and reference.
      squeezed = max(1, int(in_features * self.se_ratio))
      s = jnp.mean(x, axis=(1, 2), keepdims=True)
      s = self.act(nn.Conv(squeezed, (1, 1), kernel_init=conv_init, dtype=x.dtype,
                           name="se_reduce")(s))
      s = nn.Conv(hidden, (1, 1), kernel_init=conv_init, dtype=x.dtype, name="se_expand")(s)
      x = x * nn.sigmoid(s)
    x = conv1x1(self.features, name="project_conv")(x)
    x = self.norm(name="project_bn")(x)
    if self.stride == 1 and in_features == self.features:
      if self.drop_rate > 0:
        # Drop the whole residual branch per sample (stochastic depth); Dropout rescales by 1/keep.
        x = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  num_classes: int
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout: float = 0.2  # before the classifier
  drop_connect_rate: float = 0.2  # stochastic depth of the last block; 0 turns it off
  lite: bool = False  # Lite: relu6, no SE, fixed stem/head
  stages: Sequence[StageSpec] = B0_STAGES
  stem_features: int = 32
  head_features: int = 1280
  se_ratio: float = 0.25  # ignored when lite
  bn_momentum: float = 0.9  # Flax convention (0.9 = keep 90% of the running average per step)
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # CPU kernels of conv, depthwise conv and BN (layers.py); the trainer picks it

  def _stage_plan(self) -> list[tuple[StageSpec, int, int]]:
    """(stage, output channels, repeats) after width/depth scaling."""
    plan = []
    last = len(self.stages) - 1
    for i, stage in enumerate(self.stages):
      features = round_filters(stage.features, self.width_coefficient)
      fixed = self.lite and i in (0, last)  # Lite keeps the first and last stage's depth
      repeats = stage.repeats if fixed else round_repeats(stage.repeats, self.depth_coefficient)
      plan.append((stage, features, repeats))
    return plan

  @nn.compact
  def __call__(self, x, train: bool = False):
    # layers.BatchNorm: nn.BatchNorm's parameters, statistics and arithmetic, with the training
    # pass on oneDNN when conv_impl resolves to it.
    norm = partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                   epsilon=BN_EPSILON, dtype=self.dtype,
                   impl=self.conv_impl if BATCHNORM_IMPL == "auto" else BATCHNORM_IMPL)
    conv = partial(Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                   impl=self.conv_impl)
    act = nn.relu6 if self.lite else nn.swish
    fixed_ends = self.lite
    stem = self.stem_features if fixed_ends else round_filters(self.stem_features,
                                                               self.width_coefficient)
    head = self.head_features if fixed_ends else round_filters(self.head_features,
                                                               self.width_coefficient)
    x = x.astype(self.dtype)
    x = conv(stem, (3, 3), (2, 2), padding="SAME", name="stem_conv")(x)
    x = act(norm(name="stem_bn")(x))

    plan = self._stage_plan()
    num_blocks = sum(repeats for _, _, repeats in plan)
    index = 0
    for stage, features, repeats in plan:
      for j in range(repeats):
        x = MBConv(features, stage.kernel, stage.stride if j == 0 else 1, stage.expand,
                   se_ratio=None if self.lite else self.se_ratio,
                   drop_rate=self.drop_connect_rate * index / num_blocks, norm=norm, act=act,
                   conv_impl=self.conv_impl, name=f"block{index}")(x, train)
        index += 1

    x = conv(head, (1, 1), name="head_conv")(x)
    x = act(norm(name="head_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x).astype(jnp.float32)


EfficientNetB0 = partial(EfficientNet, width_coefficient=1.0, depth_coefficient=1.0, dropout=0.2)
EfficientNetLite0 = partial(EfficientNet, width_coefficient=1.0, depth_coefficient=1.0,
                            dropout=0.2, lite=True)
# For tests: B0's first three stages (1, 2, 2 blocks: SE, swish, k3 and k5, strides, two residual
# blocks) at 1/4 width. Compiling init and a train step costs ~half of the 7-stage variant's.
EfficientNetTiny = partial(EfficientNet, width_coefficient=0.25, depth_coefficient=1.0,
                           stages=B0_STAGES[:3], head_features=256, dropout=0.0,
                           drop_connect_rate=0.0)

register_model("efficientnet_b0", EfficientNetB0)
register_model("efficientnet_lite0", EfficientNetLite0)
register_model("efficientnet_tiny", EfficientNetTiny)
