"""A frozen patch-whitening first layer (model.kwargs.stem='whiten'), after airbench94's
`init_whiten` (arXiv 2404.00498).

A k x k VALID convolution whose 2*k*k*C filters are the eigenvectors of the training patches'
(uncentred) covariance, each scaled by 1/sqrt(eigenvalue + eps), followed by its negative: the
output patches of each half have covariance lambda / (lambda + eps), the identity up to eps, and
ReLU after the layer loses nothing since each direction appears with both signs.

The filters are fitted once from training images at a fresh start (`fit_whitening`, called by the
trainer) and never change: the module stops their gradient (no kernel-gradient compute), and the
optimizer zeroes their updates (no weight decay: jaxclf/train/optimizers.py via `is_frozen`).
They live in `params`, so checkpoints, resume, EMA and export need nothing special. The bias
trains. Before fitting, the filters are the +-identity on patches (the whitening of unit
covariance), so a model built without data still runs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MODULE_NAME = "whiten"  # the module's name in the params tree (optimizers freeze its kernel)


def is_frozen(path) -> bool:
  """Whether a params-tree path is the whitening filters (never trained)."""
  keys = [str(getattr(k, "key", k)) for k in path]
  return len(keys) >= 2 and keys[-2] == MODULE_NAME and keys[-1] == "kernel"


def patches(images: np.ndarray, kernel: int) -> np.ndarray:
  """NHWC -> (N * H' * W', k*k*C) VALID patches, flattened in (i, j, c) order: the order of an
  HWIO kernel reshaped to (k*k*C, features)."""
  x = np.asarray(images, np.float64)
  _, h, w, _ = x.shape
  ho, wo = h - kernel + 1, w - kernel + 1
  cols = [x[:, i:i + ho, j:j + wo, :] for i in range(kernel) for j in range(kernel)]
  return np.concatenate(cols, axis=-1).reshape(-1, kernel * kernel * x.shape[-1])


def fit_whitening(images: np.ndarray, kernel: int = 2, eps: float = 5e-4) -> np.ndarray:
  """Whitening filters of `images` (normalised NHWC floats) as a float32 HWIO kernel of shape
  (k, k, C, 2*k*k*C): eigenvectors by decreasing eigenvalue, scaled by 1/sqrt(eigenvalue + eps),
  then the same filters negated. Fitted in float64 (the covariance of a few million patches)."""
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"fit_whitening: expected a non-empty NHWC batch, got shape {images.shape}")
  p = patches(images, kernel)
  cov = p.T @ p / len(p)
  eigenvalues, eigenvectors = np.linalg.eigh(cov)
  order = np.argsort(eigenvalues)[::-1]
  filters = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0.0) + eps)
  w = np.concatenate([filters, -filters], axis=1)
  return w.reshape(kernel, kernel, images.shape[-1], -1).astype(np.float32)


def _identity_pairs(key, shape, dtype=jnp.float32):
  """+-identity on patches: the whitening of unit covariance, until fit_whitening replaces it."""
  del key
  kh, kw, c, f = shape
  eye = jnp.eye(kh * kw * c, dtype=dtype)
  return jnp.concatenate([eye, -eye], axis=1).reshape(kh, kw, c, f)


class Whiten(nn.Module):
  """The fitted k x k VALID whitening convolution plus a learnable bias: 2*k*k*C outputs."""
  kernel_size: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    width = 2 * k * k * c
    kernel = self.param("kernel", _identity_pairs, (k, k, c, width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (width,), jnp.float32)
    # Frozen: no gradient flows to the filters, so the step computes none (the input needs none).
    kernel = lax.stop_gradient(kernel)
    y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


def set_filters(params: dict, filters: np.ndarray) -> dict:
  """`params` with the whitening module's kernel replaced by `filters` (shape-checked)."""
  old = params[MODULE_NAME]["kernel"]
  if tuple(old.shape) != tuple(filters.shape):
    raise ValueError(f"whitening filters {filters.shape} do not fit the model's {old.shape}")
  new = jax.device_put(jnp.asarray(filters, old.dtype), getattr(old, "sharding", None))
  return {**params, MODULE_NAME: {**params[MODULE_NAME], "kernel": new}}
