"""RandAugment and TrivialAugment with timm's magnitude conventions, written once for both input
paths: every function takes the array module `xp` (numpy in Grain workers, jax.numpy inside the
jitted step), so the per-example host transform and the batched device transform share the op
definitions and, above all, the draw of which ops each example gets.

Which ops an example gets is a pure function of (seed, step, row of the global batch, layer):
a counter-based integer hash (uint32 arithmetic, bit-identical in numpy and XLA), not a stateful
RNG. The device path calls `draw` on the whole batch with the traced step; the Grain path calls
it for one example with the (step, row) its position in the epoch maps to. Same seed, same
example: the same ops, applied flags, signs and magnitudes on both paths.

Ops (config names) and what magnitude m (0..10, timm's `_LEVEL_DENOM = 10`; level = m / 10) means:

  identity        nothing
  auto_contrast   per channel, stretch [min, max] to [0, 255]          (no magnitude)
  equalize        per channel histogram equalisation, as PIL's        (no magnitude)
  rotate          +-30 * level degrees about the centre (sign drawn)
  shear_x/y       +-0.3 * level shear factor (sign drawn)
  translate_x/y   +-0.45 * level of the image side (sign drawn)
  solarize        invert pixels >= threshold; threshold 256 - 256 * level (increasing), 256 * level
  posterize       keep 4 - int(4 * level) high bits (increasing), int(4 * level) otherwise
  color, contrast, brightness, sharpness
                  PIL ImageEnhance blend factor 1 +- 0.9 * level, at least 0.1 (increasing, sign
                  drawn), 0.1 + 1.8 * level otherwise (1.0 is the unchanged image)

With `increasing` (timm's `inc1`, the default) every op's severity grows with m, and m = 0 is the
identity for all but auto_contrast, equalize and posterize (which keeps 4 bits at m = 0, as in
timm). Geometric ops sample bilinearly and fill uncovered pixels with the normalisation mean's
grey (timm's `img_mean`). Each op maps an integer-valued image in [0, 255] to one (rounded once
per op, as PIL's uint8 ops are), float32 throughout.

RandAugment: `num_ops` layers, each an op drawn uniformly (with replacement), applied with
probability `prob` (timm: 0.5), magnitude m plus N(0, magnitude_std) noise (timm's `mstd`; > 100
means uniform in [0, m]), clipped to [0, 10]. TrivialAugment: one layer, always applied, the
magnitude uniform in [0, m] on the same scales.

No jax import here: Grain workers and the serving image stay light.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

LEVEL_DENOM = 10.0
OPS = ("identity", "auto_contrast", "equalize", "rotate", "solarize", "color", "posterize",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
MODES = ("", "randaugment", "trivialaugment")
_SIGNED = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
_ENHANCE = {"color", "contrast", "brightness", "sharpness"}
_GAUSS_TERMS = 12  # Irwin-Hall: the sum of 12 uniforms minus 6 has mean 0 and variance 1
_SLOTS = 4 + _GAUSS_TERMS  # hash draws per layer: op, apply, sign, uniform magnitude, gaussian
_POW2 = np.float32(2.0) ** np.arange(9, dtype=np.float32)  # exact powers of two, 1 .. 256


class Draw(NamedTuple):
  """Per example and layer ([..., num_ops]): the op (index into the configured op list),
  whether it applies, its magnitude (0..10) and its sign (+1 or -1)."""
  op: Any
  applied: Any
  magnitude: Any
  sign: Any


# ----------------------------------------------------------------------------- the draw

def _u32(xp, v):
  """As uint32, at least 1-d (numpy warns on wrapping scalar arithmetic, not on arrays)."""
  v = xp.asarray(v).astype(xp.uint32)
  return v.reshape((1,)) if v.ndim == 0 else v


def _mix(xp, h):
  """A 32-bit avalanche mixer (lowbias32); wrapping uint32 arithmetic, the same in numpy and XLA."""
  h = h ^ (h >> xp.uint32(16))
  h = h * xp.uint32(0x7FEB352D)
  h = h ^ (h >> xp.uint32(15))
  h = h * xp.uint32(0x846CA68B)
  return h ^ (h >> xp.uint32(16))


def hash_bits(xp, seed, step, index, slot):
  """uint32 hash of (seed, step, index, slot); arrays broadcast."""
  h = _mix(xp, _u32(xp, seed) ^ xp.uint32(0x9E3779B9))
  h = _mix(xp, h ^ _u32(xp, step))
  h = _mix(xp, h ^ _u32(xp, index))
  return _mix(xp, h ^ _u32(xp, slot))


def _uniform(xp, bits):
  """[0, 1) with 24 random bits: exact in float32, so the same number on both paths."""
  return (bits >> xp.uint32(8)).astype(xp.float32) * xp.float32(2.0 ** -24)


def draw(seed: int, step, index, aug, xp=np) -> Draw:
  """The ops of examples `index` (array) at `step` under `aug` (an AugmentSpec with auto set)."""
  trivial = aug.auto == "trivialaugment"
  layers = 1 if trivial else int(aug.auto_num_ops)
  n_ops = len(aug.auto_ops)
  index = _u32(xp, index)[..., None]
  slot0 = xp.arange(layers, dtype=xp.uint32) * xp.uint32(_SLOTS)
  bits = lambda k: hash_bits(xp, seed, step, index, slot0 + xp.uint32(k))
  # op = floor(u * n_ops) in integers: (24 bits * n_ops) >> 24 fits uint32 for n_ops < 256.
  op = (((bits(0) >> xp.uint32(8)) * xp.uint32(n_ops)) >> xp.uint32(24)).astype(xp.int32)
  applied = _uniform(xp, bits(1)) < xp.float32(1.0 if trivial else aug.auto_prob)
  sign = xp.where((bits(2) & xp.uint32(1)) == 0, xp.float32(1.0), xp.float32(-1.0))
  m = xp.float32(aug.auto_magnitude)
  std = float(aug.auto_magnitude_std)
  if trivial or std > 100:  # timm: mstd > 100 means uniform in [0, m]
    magnitude = _uniform(xp, bits(3)) * m
  elif std > 0:
    total = sum((bits(4 + k) >> xp.uint32(8)) for k in range(_GAUSS_TERMS))  # exact in uint32
    z = total.astype(xp.float32) * xp.float32(2.0 ** -24) - xp.float32(_GAUSS_TERMS / 2)
    magnitude = m + xp.float32(std) * z
  else:
    magnitude = xp.zeros(op.shape, xp.float32) + m
  magnitude = xp.clip(magnitude, xp.float32(0.0), xp.float32(LEVEL_DENOM))
  return Draw(op, applied, magnitude.astype(xp.float32), sign)


# ----------------------------------------------------------------------------- the ops
# Each op: f(x, magnitude, sign, increasing, fill, xp) on one HWC float32 image.

def _q(xp, x):
  """Round to the uint8 grid (PIL ops return uint8) and clip."""
  return xp.clip(xp.floor(x + xp.float32(0.5)), xp.float32(0.0), xp.float32(255.0))


def _level(xp, magnitude):
  return xp.clip(magnitude, 0.0, LEVEL_DENOM).astype(xp.float32) / xp.float32(LEVEL_DENOM)


def _grey(xp, x):
  """PIL's 'L' conversion (ITU-R 601 luma), rounded; one channel is its own grey."""
  if x.shape[-1] == 1:
    return x[..., 0]
  return _q(xp, x[..., 0] * xp.float32(0.299) + x[..., 1] * xp.float32(0.587)
            + x[..., 2] * xp.float32(0.114))


def _blend(xp, degenerate, x, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate)."""
  return _q(xp, degenerate + factor * (x - degenerate))


def _enhance_factor(xp, magnitude, sign, increasing):
  level = _level(xp, magnitude)
  if increasing:
    return xp.maximum(xp.float32(0.1), xp.float32(1.0) + xp.float32(0.9) * level * sign)
  return xp.float32(0.1) + xp.float32(1.8) * level


def identity(x, magnitude, sign, increasing, fill, xp):
  return x


def auto_contrast(x, magnitude, sign, increasing, fill, xp):
  """PIL ImageOps.autocontrast (no cutoff) in integers: (v - lo) * 255 // (hi - lo)."""
  v = x.astype(xp.int32)
  lo, hi = v.min(axis=(0, 1)), v.max(axis=(0, 1))
  span = xp.maximum(hi - lo, 1)
  out = ((v - lo) * 255) // span
  return xp.where(hi > lo, out, v).astype(xp.float32)


def _bincount(xp, v):
  if xp is np:
    return np.bincount(v.reshape(-1), minlength=256)
  return xp.bincount(v.reshape(-1), length=256)


def equalize(x, magnitude, sign, increasing, fill, xp):
  """PIL ImageOps.equalize per channel, integer arithmetic: lut[i] = (step // 2 + #pixels
  below i) // step with step = (#pixels - #pixels of the top value) // 255."""
  chans = []
  for c in range(x.shape[-1]):
    v = x[..., c].astype(xp.int32)
    hist = _bincount(xp, v).astype(xp.int32)
    step = (v.size - hist[v.max()]) // 255
    lut = xp.minimum((step // 2 + xp.cumsum(hist) - hist) // xp.maximum(step, 1), 255)
    chans.append(xp.where(step > 0, lut[v], v))
  return xp.stack(chans, axis=-1).astype(xp.float32)


def solarize(x, magnitude, sign, increasing, fill, xp):
  level = _level(xp, magnitude)
  cut = xp.floor(xp.float32(256.0) * level)
  threshold = xp.float32(256.0) - cut if increasing else cut
  return xp.where(x < threshold, x, xp.float32(255.0) - x)


def posterize(x, magnitude, sign, increasing, fill, xp):
  cut = xp.floor(xp.float32(4.0) * _level(xp, magnitude))
  bits = xp.float32(4.0) - cut if increasing else cut
  q = xp.asarray(_POW2)[(xp.float32(8.0) - bits).astype(xp.int32)]  # 2 ** dropped bits
  return xp.floor(x / q) * q


def color(x, magnitude, sign, increasing, fill, xp):
  return _blend(xp, _grey(xp, x)[..., None], x, _enhance_factor(xp, magnitude, sign, increasing))


def contrast(x, magnitude, sign, increasing, fill, xp):
  """Blend with the mean grey level (PIL: int(mean of 'L' + 0.5)), summed exactly in uint32
  (255 * 4096**2 still fits)."""
  g = _grey(xp, x).astype(xp.uint32)
  n = g.size
  mean = ((g.sum() + xp.uint32(n // 2)) // xp.uint32(n)).astype(xp.float32)
  return _blend(xp, mean, x, _enhance_factor(xp, magnitude, sign, increasing))


def brightness(x, magnitude, sign, increasing, fill, xp):
  return _blend(xp, xp.float32(0.0), x, _enhance_factor(xp, magnitude, sign, increasing))


def sharpness(x, magnitude, sign, increasing, fill, xp):
  """Blend with PIL's SMOOTH filter (3x3, centre weight 5, /13); the border rows and columns keep
  their pixels, as in PIL."""
  h, w = x.shape[0], x.shape[1]
  box = sum(x[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  smooth = _q(xp, (box + xp.float32(4.0) * x[1:-1, 1:-1]) / xp.float32(13.0))
  inner = xp.pad(xp.ones((h - 2, w - 2, 1), bool), ((1, 1), (1, 1), (0, 0)))
  degenerate = xp.where(inner, xp.pad(smooth, ((1, 1), (1, 1), (0, 0))), x)
  return _blend(xp, degenerate, x, _enhance_factor(xp, magnitude, sign, increasing))


def _warp(xp, x, m, fill):
  """PIL's Image.transform(AFFINE, m): output pixel centre (X, Y) samples the input at
  (a X + b Y + c, d X + e Y + f), bilinearly; outside the image is `fill`. The identity matrix
  reproduces the image exactly (integer sample positions, zero weights)."""
  a, b, c, d, e, f = m
  h, w = x.shape[0], x.shape[1]
  yy = xp.arange(h, dtype=xp.float32)[:, None] + xp.float32(0.5)
  xx = xp.arange(w, dtype=xp.float32)[None, :] + xp.float32(0.5)
  sx = a * xx + b * yy + c - xp.float32(0.5)
  sy = d * xx + e * yy + f - xp.float32(0.5)
  x0, y0 = xp.floor(sx), xp.floor(sy)
  wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
  x0, y0 = x0.astype(xp.int32), y0.astype(xp.int32)

  def tap(yi, xi):
    inside = ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w))[..., None]
    return xp.where(inside, x[xp.clip(yi, 0, h - 1), xp.clip(xi, 0, w - 1)], fill)

  top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
  bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
  return _q(xp, top * (1 - wy) + bottom * wy)


def rotate(x, magnitude, sign, increasing, fill, xp):
  theta = xp.float32(np.pi / 180 * 30) * _level(xp, magnitude) * sign
  cos, sin = xp.cos(theta), xp.sin(theta)
  cx, cy = xp.float32(x.shape[1] / 2), xp.float32(x.shape[0] / 2)
  return _warp(xp, x, (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy),
               fill)


def shear_x(x, magnitude, sign, increasing, fill, xp):
  s = xp.float32(0.3) * _level(xp, magnitude) * sign
  return _warp(xp, x, (1.0, s, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(x, magnitude, sign, increasing, fill, xp):
  s = xp.float32(0.3) * _level(xp, magnitude) * sign
  return _warp(xp, x, (1.0, 0.0, 0.0, s, 1.0, 0.0), fill)


def translate_x(x, magnitude, sign, increasing, fill, xp):
  t = xp.float32(0.45) * _level(xp, magnitude) * sign * xp.float32(x.shape[1])
  return _warp(xp, x, (1.0, 0.0, t, 0.0, 1.0, 0.0), fill)


def translate_y(x, magnitude, sign, increasing, fill, xp):
  t = xp.float32(0.45) * _level(xp, magnitude) * sign * xp.float32(x.shape[0])
  return _warp(xp, x, (1.0, 0.0, 0.0, 0.0, 1.0, t), fill)


OP_FNS = {name: globals()[name] for name in OPS}


def fill_value(spec) -> np.ndarray:
  """The grey (per channel) that geometric ops leave behind: the normalisation mean, as timm's
  `img_mean` hyperparameter, so uncovered pixels normalise to 0."""
  return np.round(np.asarray(spec.mean, np.float32) * 255.0).astype(np.float32)


def apply_op(name: str, x, magnitude, sign, aug, fill, xp=np):
  return OP_FNS[name](x, magnitude, sign, bool(aug.auto_increasing), fill, xp)


def augment_example(img: np.ndarray, aug, spec, seed: int, step: int, row: int) -> np.ndarray:
  """The host path: uint8 HWC -> uint8 HWC, the ops `draw` gives example (step, row)."""
  d = draw(seed, np.asarray(step), np.asarray([row]), aug, np)
  x = img.astype(np.float32)
  fill = fill_value(spec)
  for layer in range(d.op.shape[-1]):
    if d.applied[0, layer]:
      x = apply_op(aug.auto_ops[int(d.op[0, layer])], x, d.magnitude[0, layer],
                   d.sign[0, layer], aug, fill, np)
  return x.astype(np.uint8)
