"""Mixup and CutMix on a whole training batch inside the jitted step, with timm's semantics.

Each example i is mixed with its partner, row n-1-i (the batch reversed, timm's `x.flip(0)`):
Mixup blends the two images with weight lambda ~ Beta(alpha, alpha); CutMix pastes a box of the
partner whose side is sqrt(1 - lambda) of the image's, centred uniformly and clipped at the
border, and then sets lambda to the share of the image that stayed the example's own (timm's
`correct_lam`). With both on, each draw picks CutMix with probability `mix_switch_prob`. A draw
mixes at all with probability `mix_prob` (else lambda = 1). `mix_mode` 'batch' draws once for
the batch (one box, one lambda), 'elem' once per example.

The batch gains `mix_label` (the partner's label) and `mix_weight` (lambda per example); the
loss turns them into soft targets with `mixed_targets`, which is timm's `mixup_target`:
lambda * smooth(y) + (1 - lambda) * smooth(y_partner) with smooth(y) = one_hot(y) * (1 - s) +
s / num_classes (train.label_smoothing), so smoothing is applied once, as in timm. Keys come
from `fold_in(key, step)`: a resumed run mixes the same way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mixed_targets(labels, partner, lam, num_classes: int, smoothing: float = 0.0):
  """Soft targets [n, num_classes]; every row sums to 1 and puts lam on the example's class."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  one_hot = lambda y: jax.nn.one_hot(y, num_classes) * (on - off) + off
  lam = jnp.asarray(lam, jnp.float32)[..., None]
  return lam * one_hot(labels) + (1.0 - lam) * one_hot(partner)


def cutmix_box(key, lam, height: int, width: int):
  """timm's rand_bbox: (top, bottom, left, right) of the pasted box and the corrected lambda
  1 - box area / image area. Any leading shape of `lam` (one box per value)."""
  k_y, k_x = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, jnp.shape(lam), 0, height)
  cx = jax.random.randint(k_x, jnp.shape(lam), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  corrected = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
  return (top, bottom, left, right), corrected


def box_mask(box, height: int, width: int):
  """bool [..., height, width]: inside the box."""
  top, bottom, left, right = (jnp.asarray(v)[..., None, None] for v in box)
  yy = jnp.arange(height)[:, None]
  xx = jnp.arange(width)[None, :]
  return (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)


def _draw_lambda(key, shape, aug):
  """(lambda, use_cutmix, mixed at all) with timm's choice between the two families."""
  k_mix, k_cut, k_switch, k_apply = jax.random.split(key, 4)
  mixup, cutmix = float(aug.mixup), float(aug.cutmix)
  lam_mix = jax.random.beta(k_mix, mixup, mixup, shape) if mixup > 0 else jnp.ones(shape)
  lam_cut = jax.random.beta(k_cut, cutmix, cutmix, shape) if cutmix > 0 else jnp.ones(shape)
  if mixup > 0 and cutmix > 0:
    use_cutmix = jax.random.uniform(k_switch, shape) < aug.mix_switch_prob
  else:
    use_cutmix = jnp.full(shape, cutmix > 0)
  apply = jax.random.uniform(k_apply, shape) < aug.mix_prob
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  return lam, use_cutmix, apply


def mix_batch(batch, key, aug):
  """{image [n,H,W,C] float, label [n]} -> the mixed batch with mix_label and mix_weight."""
  images, labels = batch["image"], batch["label"]
  n, h, w = images.shape[0], images.shape[1], images.shape[2]
  shape = (n,) if aug.mix_mode == "elem" else ()
  k_lam, k_box = jax.random.split(key)
  lam, use_cutmix, apply = _draw_lambda(k_lam, shape, aug)
  lam = jnp.where(apply, lam, 1.0)
  box, corrected = cutmix_box(k_box, lam, h, w)
  pasted = box_mask(box, h, w) & use_cutmix[..., None, None]
  lam = jnp.where(use_cutmix, corrected, lam)
  lam_n = jnp.broadcast_to(lam, (n,))
  partner = images[::-1]
  blend = (images * lam_n[:, None, None, None]
           + partner * (1.0 - lam_n)[:, None, None, None]).astype(images.dtype)
  pasted = jnp.broadcast_to(pasted, (n, h, w))[..., None]
  cut = jnp.broadcast_to(use_cutmix, (n,))[:, None, None, None]
  mixed = jnp.where(pasted, partner, jnp.where(cut, images, blend))
  return {**batch, "image": mixed, "mix_label": labels[::-1], "mix_weight": lam_n}
