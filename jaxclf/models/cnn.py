"""A configurable VGG-style CNN, the default for small images such as Fashion-MNIST.

`layers` reads like a VGG table: ints are 3x3 conv-BN-ReLU widths, 'M' a 2x2 max pool.

Training levers from the fast small-image literature (airbench94, arXiv 2404.00498; Page's "How to
train your ResNet"), each off by default, where the net is exactly the plain one:
  bn_scale='frozen'   every BatchNorm scale is the constant 1 (only the shift trains);
  conv_init='dirac'   the 3x3 convs after the stem start as the identity on their first
                      min(c_in, c_out) output channels (PyTorch's nn.init.dirac_), the rest as
                      weight_init;
  head_scale=s        the logits times s (airbench 1/9, Page 0.125);
  stem='whiten'       a frozen k x k patch-whitening conv (whitening.py, whiten_kernel,
                      whiten_eps) + ReLU before `layers`; the trainer fits its filters.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxclf.config.names import CNN_CHOICES
from jaxclf.models.layers import BatchNorm, Conv, StemConv, max_pool_2x2
from jaxclf.models.registry import register_model
from jaxclf.models.whitening import MODULE_NAME as WHITEN_NAME, Whiten

# Kernel initialisers by name. 'torch' is PyTorch's default for Conv2d and Linear
# (kaiming_uniform with a=sqrt(5): U(+-1/sqrt(fan_in)), a third of lecun_normal's variance), so a
# net ported from PyTorch starts where it did: with BatchNorm after each conv the init scale sets
# the effective learning rate (gradients scale as 1/|w|), and configs/cnn.py's weight decay cannot
# undo it in 10 epochs (lr x wd summed over the schedule is 0.11: at most about a 10% shrink).
KERNEL_INITS = {
    "lecun": nn.initializers.lecun_normal(),
    "torch": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}


def dirac_init(base: Callable) -> Callable:
  """`base`, then the identity on the first min(c_in, c_out) output channels of an HWIO kernel:
  their centre tap is 1 on the matching input channel, every other tap 0 (nn.init.dirac_), so at
  init those channels pass their input through a SAME convolution unchanged."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    w = base(key, shape, dtype).at[..., :n].set(0)
    return w.at[kh // 2, kw // 2, jnp.arange(n), jnp.arange(n)].set(1)
  return init


class CNN(nn.Module):
  num_classes: int
  layers: Sequence[Any] = (32, 32, "M", 64, 64, "M", 128, "M")
  hidden: Sequence[int] = ()  # widths of dense layers before the classifier
  dropout: float = 0.2
  global_pool: str = "flatten"  # 'flatten' | 'avg'
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # CPU kernels of conv, BN and pool (layers.py); the trainer picks it
  weight_init: str = "lecun"  # kernel initialiser: a KERNEL_INITS name

  bn_scale: str = "learned"  # 'learned' | 'frozen': BatchNorm scales fixed at 1
  conv_init: str = "default"  # 'default' | 'dirac': identity-initialised 3x3 convs after the stem
  head_scale: float = 1.0  # the logits times this constant (1 = no extra op)
  stem: str = "conv"  # 'conv' | 'whiten': a frozen patch-whitening layer before `layers`
  whiten_kernel: int = 2  # stem='whiten': patch side k (2*k*k*C filters)
  whiten_eps: float = 5e-4  # stem='whiten': added to each eigenvalue (the trainer's fit reads it)

  def _check(self):
    if self.weight_init not in KERNEL_INITS:
      raise ValueError(f"model.kwargs.weight_init={self.weight_init!r}: use one of "
                       f"{sorted(KERNEL_INITS)}")
    for key, allowed in CNN_CHOICES.items():
      if getattr(self, key) not in allowed:
        raise ValueError(f"model.kwargs.{key}={getattr(self, key)!r}: use one of {list(allowed)}")

  @nn.compact
  def __call__(self, x, train: bool = False):
    self._check()
    k_init = KERNEL_INITS[self.weight_init]
    norm = partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, relu=True, impl=self.conv_impl,
                   frozen_scale=self.bn_scale == "frozen")
    x = x.astype(self.dtype)
    if self.stem == "whiten":
      x = nn.relu(Whiten(int(self.whiten_kernel), dtype=self.dtype, name=WHITEN_NAME)(x))
    conv_init = dirac_init(k_init) if self.conv_init == "dirac" else k_init
    for i, spec in enumerate(self.layers):
      if spec == "M":
        x = max_pool_2x2(x, self.conv_impl)
      else:
        if i == 0 and x.shape[-1] <= 4:  # few input channels: patches @ kernel is faster on CPU
          x = StemConv(int(spec), dtype=self.dtype, impl=self.conv_impl, kernel_init=k_init)(x)
        else:
          x = Conv(int(spec), (3, 3), use_bias=False, dtype=self.dtype, impl=self.conv_impl,
                   kernel_init=conv_init)(x)
        x = norm()(x)  # conv-BN-ReLU
    x = x.mean(axis=(1, 2)) if self.global_pool == "avg" else x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=k_init)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=k_init)(x)
    if float(self.head_scale) != 1.0:  # a constant Mul in the graph (ONNX: Mul)
      x = x * jnp.asarray(float(self.head_scale), x.dtype)
    return x.astype(jnp.float32)

register_model("cnn", CNN)
register_model("cnn_tiny", partial(CNN, layers=(8, "M", 16, "M"), dropout=0.0))
