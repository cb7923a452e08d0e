"""Augmentation and normalisation of whole batches inside the jitted train step, for datasets whose
decoded pixels sit in memory (Fashion-MNIST, small folders): the host only gathers uint8 rows.

Why: on 2 cores, the per-example Python map of the Grain path (`transforms.augment`) keeps one
core busy, which is half the machine the train step could use. Here the batch arrives as uint8
NHWC and `prepare_batch` normalises and augments it on the device with keys
`fold_in(key, step)`, so a resumed run draws exactly the same augmentations.

The same `transforms.AugmentSpec` drives both paths. Supported here: translate (edge-padded
random crop, as the host path), hflip (a coin per row, or with augment.hflip_mode=alternate the
batch's 'hflip' flags, decided on the host), vflip, and small rotations (bilinear, edge fill; the host
path fills with the border's median grey, so rotated pixels at the corners differ slightly).
Other switches (random_resized_crop, colour jitter) need the per-example host path:
`supports(aug)` says which applies. Normalisation is `transforms.normalize`'s arithmetic, so a
batch without augmentation is bit-identical to the host path's.

After those: RandAugment/TrivialAugment (jaxclf/data/autoaugment.py: the same ops per example as
the Grain path, drawn from (seed, step, row)), normalisation, random erasing (the geometry of
`transforms.erase_mask`), then Mixup/CutMix (jaxclf/data/mixing.py; on the Grain path the step
runs `make_mix_fn`, the same mixing of its already normalised batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxclf.data import autoaugment, mixing, transforms
from jaxclf.data.transforms import AugmentSpec, PreprocessSpec

_HOST_ONLY = ("random_resized_crop", "brightness", "contrast", "saturation")


def supports(aug: AugmentSpec) -> bool:
  return not any(getattr(aug, name) for name in _HOST_ONLY)


def normalize(images, spec: PreprocessSpec):
  """uint8 (or float pixel-valued) NHWC -> float32 model input, as `transforms.normalize`."""
  mean = np.asarray(spec.mean, np.float32) * np.float32(255.0)
  inv_std = np.float32(1.0) / (np.asarray(spec.std, np.float32) * np.float32(255.0))
  return (images.astype(jnp.float32) - mean) * inv_std


def _translate(images, key, pad: int):
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def _flip(images, key, axis: int, flip=None):
  """Mirrors the rows where `flip` (bool [N]; a fair coin per row when None)."""
  if flip is None:
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], jnp.flip(images, axis=axis), images)


def _rotate(images, key, max_degrees: float):
  """Bilinear rotation about the centre by a uniform angle in [-max, max], edge-clamped."""
  n, h, w, _ = images.shape
  theta = jnp.deg2rad(jax.random.uniform(key, (n,), minval=-max_degrees, maxval=max_degrees))
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0

  def one(im, t):
    c, s = jnp.cos(t), jnp.sin(t)
    # Inverse map: where each output pixel comes from in the input.
    sy = c * (yy - cy) - s * (xx - cx) + cy
    sx = s * (yy - cy) + c * (xx - cx) + cx
    return jnp.stack([jax.scipy.ndimage.map_coordinates(im[..., ch], [sy, sx], order=1,
                                                        mode="nearest")
                      for ch in range(im.shape[-1])], axis=-1)

  return jax.vmap(one)(images.astype(jnp.float32), theta)


def augment(images, key, aug: AugmentSpec, hflip=None):
  """Pixel-valued NHWC batch -> augmented batch, deterministic given `key` (and `hflip`, the
  rows' flips when aug.alternating_hflip: the batch's 'hflip' field, see `make_prepare_fn`)."""
  k_translate, k_rotate, k_hflip, k_vflip = jax.random.split(key, 4)
  x = images
  if aug.translate:
    x = _translate(x, k_translate, int(aug.translate))
  if aug.rotation:
    x = _rotate(x, k_rotate, float(aug.rotation))
  if aug.hflip:
    x = _flip(x, k_hflip, axis=2, flip=hflip if aug.alternating_hflip else None)
  if aug.vflip:
    x = _flip(x, k_vflip, axis=1)
  return x


def auto_augment(images, aug: AugmentSpec, spec: PreprocessSpec, seed: int, step):
  """RandAugment/TrivialAugment of a pixel-valued NHWC batch: row i gets the ops
  `autoaugment.draw(seed, step, i)`, exactly those the Grain path gives that example. Each
  example runs every op and keeps the drawn one (a select under vmap): cheap next to the step."""
  d = autoaugment.draw(seed, step, jnp.arange(images.shape[0]), aug, jnp)
  fill = jnp.asarray(autoaugment.fill_value(spec))
  names = ("identity",) + tuple(aug.auto_ops)  # branch 0: the layer's op did not apply
  branches = [lambda x, m, s, name=name: autoaugment.apply_op(name, x, m, s, aug, fill, jnp)
              for name in names]
  one = lambda x, k, m, s: jax.lax.switch(k, branches, x, m, s)
  x = jnp.clip(jnp.floor(images.astype(jnp.float32) + 0.5), 0.0, 255.0)  # the uint8 grid
  for layer in range(d.op.shape[-1]):
    k = jnp.where(d.applied[:, layer], d.op[:, layer] + 1, 0)
    x = jax.vmap(one)(x, k, d.magnitude[:, layer], d.sign[:, layer])
  return x


def random_erase(x, key, aug: AugmentSpec):
  """timm's random erasing of a normalised NHWC batch, per example with probability
  aug.random_erasing; the box from `transforms.erase_mask`."""
  n, h, w, c = x.shape
  k_apply, k_box, k_fill = jax.random.split(key, 3)
  u = jax.random.uniform(k_box, (n, transforms.ERASE_ATTEMPTS, 4))
  mask = transforms.erase_mask(u, h, w, aug, jnp)
  mask &= (jax.random.uniform(k_apply, (n,)) < aug.random_erasing)[:, None, None]
  fill = (jax.random.normal(k_fill, x.shape, x.dtype) if aug.erasing_mode == "pixel"
          else jnp.zeros_like(x))
  return jnp.where(mask[..., None], fill, x)


def _hflip_rows(batch):
  if "hflip" not in batch:
    raise ValueError("augment.hflip_mode=alternate: the batch has no 'hflip' field (the rows' "
                     "flips, which inputs.TrainInput adds on the device path)")
  return batch["hflip"]


_ERASE, _MIX = 0x45524153, 0x4D495821  # fold_in tags: these draws leave the others unchanged


def make_mix_fn(aug: AugmentSpec | None, key):
  """The Grain path's `prepare(batch, step)`: Mixup/CutMix of the ready batch (None when off)."""
  if aug is None or not aug.mixing:
    return None
  return lambda batch, step: mixing.mix_batch(
      batch, jax.random.fold_in(jax.random.fold_in(key, step), _MIX), aug)


def make_prepare_fn(spec: PreprocessSpec, aug: AugmentSpec | None, key, seed: int = 0):
  """The `prepare(batch, step)` hook of `steps.train_step`: augment (keyed by fold_in(key, step);
  auto-augment by (seed, step, row)), normalise, erase and mix a uint8 batch. `aug=None`
  normalises only (evaluation). With augment.hflip_mode=alternate the batch carries 'hflip'
  (bool per row, `transforms.alternate_hflips` of its examples and epoch, inputs.TrainInput):
  the flips are decided on the host, where the example's index and the epoch are known."""
  if aug is not None and not supports(aug):
    raise ValueError(f"augmentations {[n for n in _HOST_ONLY if getattr(aug, n)]} run on the "
                     "host only; set data.on_device=false")

  def prepare(batch, step):
    images = batch["image"]
    if aug is None:
      return {**batch, "image": normalize(images, spec)}
    step_key = jax.random.fold_in(key, step)
    if aug.alternating_hflip:  # the flags are consumed here: the step sees image and label
      images = augment(images, step_key, aug, _hflip_rows(batch))
      batch = {k: v for k, v in batch.items() if k != "hflip"}
    else:
      images = augment(images, step_key, aug)
    if aug.auto:
      images = auto_augment(images, aug, spec, seed, step)
    x = normalize(images, spec)
    if aug.random_erasing:
      x = random_erase(x, jax.random.fold_in(step_key, _ERASE), aug)
    batch = {**batch, "image": x}
    if aug.mixing:
      batch = mixing.mix_batch(batch, jax.random.fold_in(step_key, _MIX), aug)
    return batch

  return prepare
