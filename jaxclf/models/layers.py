"""Layers that train faster under XLA's CPU backend, with the same maths and parameters as the
stock Flax ones (measured in bench/train.py and bench/conv.py; on GPU they are neutral).

- `Conv`: a drop-in for `nn.Conv` (same class name, so the same auto-generated module names
  `Conv_0`, ...; the same HWIO `kernel` and optional `bias` parameters), whose gradient can run on
  a faster path than XLA's CPU convolution gradient (openxla/xla#34273), chosen by `impl`:
    'xla'     stock `lax.conv_general_dilated`, gradients by autodiff. Used on GPU (cuDNN) and by
              ONNX export, which must see a plain convolution (`Conv` node).
    'matmul'  pure JAX: XLA's forward and input gradient (both fast on CPU), and the kernel
              gradient as one matmul per kernel tap over shifted input slices, a `custom_vjp`.
    'onednn'  the forward by XLA, both gradients by oneDNN (the library PyTorch uses on CPU),
              through `jax.ffi` (`jaxclf/ops/onednn.py`; needs the extension built by setup).
    'auto'    'onednn' on CPU when the extension is built, else 'matmul'; 'xla' off CPU.
  Measured on the anchor CNN's layers (batch 256, 2 CPU cores, both sides in the same run, ms):

    layer (HxW cin->cout)   forward   kernel grad: xla autodiff / 'matmul'   input grad
    28x28  32->32             128              2376 / 580                      123
    14x14  32->64              52               186 / 187                       39
    14x14  64->64             107               443 / 414                      102
     7x7   64->128             55               137 / 121                       80

  XLA's kernel gradient for the full-resolution 32->32 layer costs 18x its forward pass; one
  matmul per tap is 4x faster there and level elsewhere. Variants that measured slower: a single
  im2col matmul (the (B*H*W) x 9C buffer is memory-bound: 1011 ms), einsum per tap (1640 ms),
  K-chunked batched matmuls (1116 ms), per-row column concat (747 ms).
- `BatchNorm(relu=..., impl=...)` and `max_pool_2x2(x, impl)`: with impl 'onednn' (what the
  models pass from their `conv_impl`) the training pass runs oneDNN's batch-normalisation (ReLU
  fused) and pooling primitives; bench/levers_ab.py measures them against the XLA forms below.
- `max_pool_2x2`: a reshape + max. XLA CPU lowers `nn.max_pool`'s gradient to select-and-scatter,
  which measured ~0.2 s of a 0.9 s CNN step here; the reshape form's gradient is a cheap compare.
  Same result as `nn.max_pool(x, (2, 2), (2, 2))` with VALID padding (odd edges are dropped).
- `StemConv`: a 3x3 'SAME' convolution for inputs with few channels (grey/RGB images), computed as
  patches @ kernel (or by oneDNN with impl='onednn': 2.6 / 11.4 / 2.9 ms forward / input grad /
  kernel grad at 28 px 1->32, batch 256, bench/conv.py). XLA CPU's convolution gradient for 1 input channel measured 74 ms against
  20 ms this way. The parameter is the usual HWIO `kernel`, so checkpoints are interchangeable
  with `nn.Conv(features, (3, 3), use_bias=False)`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "matmul", "onednn")
_DIMS = ("NHWC", "HWIO", "NHWC")


def max_pool_2x2(x, impl: str = "xla"):
  """2x2 / stride 2 max pool, VALID (odd edges dropped). impl 'onednn' (or 'auto' resolving to
  it) runs oneDNN's pooling primitive with an argmax workspace: 7.4-8.7 ms forward + backward
  against 26-30 ms for the reshape form at 256x28x28x32 (2 cores, loaded)."""
  if _norm_pool_on_onednn(impl, x):
    from jaxclf.ops import onednn
    return onednn.max_pool(x, (2, 2), (2, 2))
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class StemConv(nn.Module):
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  impl: str = "xla"  # 'onednn' (when built) runs oneDNN's conv, faster still; else patches
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features), jnp.float32)
    if resolve_conv_impl(self.impl) == "onednn" and self.dtype == jnp.float32:
      return conv2d(x.astype(jnp.float32), kernel, impl="onednn")
    b, h, w, _ = x.shape
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
    # Patch channel order (i, j, c) matches the HWIO kernel flattened to (k*k*cin, features).
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
    return jnp.dot(cols.astype(self.dtype), kernel.reshape(k * k * cin, self.features).astype(self.dtype))


# ----------------------------------------------------------------------------- convolution

def _norm_pool_on_onednn(impl: str, x) -> bool:
  """BatchNorm / max pool on oneDNN: NHWC float32 and `impl` resolving to 'onednn'."""
  if impl == "xla" or x.ndim != 4 or x.dtype != jnp.float32 or resolve_conv_impl(impl) != "onednn":
    return False
  from jaxclf.ops import onednn
  return onednn.norm_pool_available()


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> the fastest implementation this process can run (see the module docstring)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl {impl!r}: expected one of {', '.join(CONV_IMPLS)}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  from jaxclf.ops import onednn
  return "onednn" if onednn.available() else "matmul"


def _explicit_padding(padding, kernel_hw, strides, in_hw):
  if not isinstance(padding, str):
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))


def _xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMS)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_grad_conv(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _matmul_grad_conv_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def kernel_grad_by_taps(x, g, kernel_shape, strides, padding):
  """d(loss)/d(kernel) of a NHWC x HWIO convolution: for each kernel tap (i, j), the input
  slice that tap sees, flattened to (N*Ho*Wo, Cin), contracted with g flattened to (N*Ho*Wo, Cout)."""
  kh, kw, cin, cout = kernel_shape
  (plo_h, phi_h), (plo_w, phi_w) = padding
  sh, sw = strides
  _, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
  g2 = g.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1,
                                        cin), (1, sh, sw, 1))
      taps.append(xs.reshape(-1, cin).T @ g2)
  return jnp.stack(taps).reshape(kernel_shape)


def _matmul_grad_conv_bwd(strides, padding, res, g):
  x, kernel = res
  # The input gradient is XLA's own transpose of the convolution: a forward-style convolution,
  # which XLA runs fast on CPU (measured level with an explicit flipped-kernel conv).
  dx = jax.linear_transpose(lambda v: _xla_conv(v, kernel, strides, padding),
                            jax.ShapeDtypeStruct(x.shape, x.dtype))(g)[0]
  return dx, kernel_grad_by_taps(x, g, kernel.shape, strides, padding).astype(kernel.dtype)


_matmul_grad_conv.defvjp(_matmul_grad_conv_fwd, _matmul_grad_conv_bwd)


def conv2d(x, kernel, strides=(1, 1), padding="SAME", impl: str = "xla"):
  """`lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))` with the
  gradient computed by `impl` (see the module docstring). Same values, forward and backward, to
  float32 rounding (tests/test_layers.py)."""
  impl = resolve_conv_impl(impl)
  strides = tuple(int(s) for s in strides)
  pads = _explicit_padding(padding, kernel.shape[:2], strides, x.shape[1:3])
  if impl == "xla" or x.dtype != jnp.float32:
    return _xla_conv(x, kernel, strides, pads)
  if impl == "onednn":
    from jaxclf.ops import onednn
    return onednn.conv2d(x, kernel, strides=strides, padding=pads)
  return _matmul_grad_conv(x, kernel, strides, pads)


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else tuple(int(s) for s in v)


class Conv(nn.Module):
  """`nn.Conv` for 2-D NHWC inputs with `feature_group_count=1`, no dilation, and a choice of
  gradient implementation (`impl`). Parameters and names are those of `nn.Conv`, so checkpoints,
  pretrained weights, the weight converters and ONNX export see no difference."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(tuple(self.kernel_size))
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
        if self.use_bias else None
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = conv2d(x.astype(dtype), kernel.astype(dtype), _pair(self.strides), self.padding,
               self.impl)
    return y if bias is None else y + bias.astype(dtype)


# ----------------------------------------------------------------------------- batch norm

@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_train(x, scale, bias, epsilon):
  return _bn_train_fwd(x, scale, bias, epsilon)[0]


def _bn_train_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = xf.mean(axes)
  var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)  # flax's fast variance
  inv = lax.rsqrt(var + epsilon)
  y = (xf - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _bn_train_bwd(epsilon, res, cotangents):
  # The statistics feed only the running averages (not the loss): their cotangents are zero.
  x, mean, inv, scale = res
  g = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  n = g.size // g.shape[-1]
  xhat = (x.astype(jnp.float32) - mean) * inv
  dbias = g.sum(axes)
  dscale = (g * xhat).sum(axes)
  dx = (scale * inv / n) * (n * g - dbias - xhat * dscale)
  return dx.astype(x.dtype), dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis (same class name, parameters `scale`/`bias`, statistics
  `mean`/`var`, update rule and fast variance), with a hand-written backward pass: two reductions
  and one elementwise pass, where autodiff of flax's graph measured 36 ms against ~14 ms for a
  256x28x28x32 activation on 2 cores (bench/step_profile.py, `batchnorm` row).

  `relu=True` returns relu(bn(x)) (one module, the same parameters as BatchNorm then nn.relu).
  `impl='onednn'` (or 'auto' resolving to it, as for `Conv`) runs the training-mode pass on
  oneDNN's batch-normalisation primitive, with the ReLU fused (its backward reads a 1-bit mask).
  Evaluation mode always uses the plain arithmetic below, which is what export sees."""
  use_running_average: bool = False
  relu: bool = False
  impl: str = "xla"
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  scale_init: Callable = nn.initializers.ones_init()
  bias_init: Callable = nn.initializers.zeros_init()
  # Scale fixed at 1 (the CNN's bn_scale='frozen'): the `scale` parameter is still created, so
  # checkpoints, EMA and export see the usual tree, but both paths multiply by a constant 1.
  frozen_scale: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    if self.frozen_scale:  # a constant: zero gradient, the parameter stays at its init (1)
      scale = jnp.ones_like(scale)
    bias = self.param("bias", self.bias_init, (c,), jnp.float32)
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      y = x.astype(jnp.float32) - ra_mean.value  # flax's own eval arithmetic
      y = y * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return self._act(y).astype(dtype)
    if _norm_pool_on_onednn(self.impl, x):
      from jaxclf.ops import onednn
      y, mean, var = onednn.batch_norm_train(x, scale, bias, epsilon=self.epsilon, relu=self.relu)
    else:
      y, mean, var = _bn_train(x, scale, bias, self.epsilon)
      y = self._act(y)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return y.astype(dtype)

  def _act(self, y):
    return jax.nn.relu(y) if self.relu else y
