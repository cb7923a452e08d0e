"""Layers that train faster under XLA's CPU backend, with the same maths and parameters as the
stock Flax ones (measured in bench/train.py; on GPU they are neutral).

- `max_pool_2x2`: a reshape + max. XLA CPU lowers `nn.max_pool`'s gradient to select-and-scatter,
  which measured ~0.2 s of a 0.9 s CNN step here; the reshape form's gradient is a cheap compare.
  Same result as `nn.max_pool(x, (2, 2), (2, 2))` with VALID padding (odd edges are dropped).
- `StemConv`: a 3x3 'SAME' convolution for inputs with few channels (grey/RGB images), computed as
  patches @ kernel. XLA CPU's convolution gradient for 1 input channel measured 74 ms against
  20 ms this way. The parameter is the usual HWIO `kernel`, so checkpoints are interchangeable
  with `nn.Conv(features, (3, 3), use_bias=False)`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def max_pool_2x2(x):
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class StemConv(nn.Module):
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, cin, self.features),
                        jnp.float32)
    b, h, w, _ = x.shape
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
    # Patch channel order (i, j, c) matches the HWIO kernel flattened to (k*k*cin, features).
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
    return jnp.dot(cols.astype(self.dtype), kernel.reshape(k * k * cin, self.features).astype(self.dtype))
