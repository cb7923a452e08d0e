"""Mixup / CutMix (jaxclf/data/mixing.py), their soft targets through the loss
(jaxclf/train/steps.py), and random erasing on both input paths (transforms.erase_mask)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclf.data import device_augment, mixing, transforms
from jaxclf.train import steps

N, H, W = 32, 16, 20
# Compiled once per spec (AugmentSpec is hashable): far fewer dispatches than eager mode.
mix_batch = jax.jit(mixing.mix_batch, static_argnums=2)
random_erase = jax.jit(device_augment.random_erase, static_argnums=2)


def constant_batch(n=N):
  """Image i is the constant i + 1, so every pixel says which example it came from."""
  images = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[:, None, None, None],
                            (n, H, W, 1))
  return {"image": images, "label": jnp.arange(n) % 10}


def test_mixed_targets_sum_to_one_and_match_lambda_with_timm_smoothing():
  labels, partner = jnp.array([0, 3, 7]), jnp.array([3, 3, 1])
  lam = jnp.array([0.7, 0.2, 1.0])
  t = np.asarray(mixing.mixed_targets(labels, partner, lam, 10, smoothing=0.1))
  np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)
  off, on = 0.1 / 10, 1 - 0.1 + 0.1 / 10  # timm's mixup_target
  np.testing.assert_allclose(t[0, 0], 0.7 * on + 0.3 * off, rtol=1e-6)
  np.testing.assert_allclose(t[0, 3], 0.3 * on + 0.7 * off, rtol=1e-6)
  np.testing.assert_allclose(t[1, 3], on, rtol=1e-6)  # both labels the same class
  np.testing.assert_allclose(t[2], optax.smooth_labels(jax.nn.one_hot(7, 10), 0.1), rtol=1e-6)


def test_mixup_blends_each_example_with_the_reversed_batch_by_one_lambda():
  b = constant_batch()
  out = mix_batch(b, jax.random.key(0), transforms.AugmentSpec(mixup=0.8))
  lam = np.asarray(out["mix_weight"])
  assert np.all(lam == lam[0]) and 0 < lam[0] < 1  # mode batch: one lambda
  expected = lam[0] * np.arange(1, N + 1) + (1 - lam[0]) * np.arange(N, 0, -1)
  np.testing.assert_allclose(np.asarray(out["image"])[:, 0, 0, 0], expected, rtol=1e-6)
  np.testing.assert_array_equal(out["mix_label"], np.asarray(b["label"])[::-1])


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_pasted_area_matches_its_lambda_after_clipping(mode):
  b = constant_batch()
  for seed in range(8):
    out = mix_batch(b, jax.random.key(seed), transforms.AugmentSpec(cutmix=1.0, mix_mode=mode))
    img, lam = np.asarray(out["image"])[..., 0], np.asarray(out["mix_weight"])
    for i in range(N):
      own = i + 1
      pasted = img[i] == N - i  # the partner's constant
      if own == N - i:  # an odd batch's middle example is its own partner
        continue
      assert ((img[i] == own) | pasted).all()  # pasted, never blended
      assert pasted.sum() == round((1 - lam[i]) * H * W), (seed, i)
      rows, cols = np.flatnonzero(pasted.any(axis=1)), np.flatnonzero(pasted.any(axis=0))
      if pasted.any():  # one axis-aligned box
        assert pasted.sum() == len(rows) * len(cols)
    if mode == "elem":
      assert len(np.unique(lam)) > 1


def test_cutmix_box_is_clipped_at_the_border_and_lambda_corrected():
  lam = jnp.full((2000,), 0.3)
  (top, bottom, left, right), corrected = mixing.cutmix_box(jax.random.key(1), lam, H, W)
  area = np.asarray((bottom - top) * (right - left))
  np.testing.assert_allclose(np.asarray(corrected), 1 - area / (H * W), rtol=1e-6)
  full = int(H * math.sqrt(0.7)) // 2 * 2 * (int(W * math.sqrt(0.7)) // 2 * 2)
  assert area.max() == full and area.min() < full  # clipped boxes are smaller, lambda larger
  assert (np.asarray(corrected) >= 0.3 - 1e-6).all()


def test_mixing_off_by_probability_leaves_the_batch_alone():
  b = constant_batch()
  out = mix_batch(b, jax.random.key(2), transforms.AugmentSpec(mixup=0.8, cutmix=1.0,
                                                                      mix_prob=0.0))
  np.testing.assert_array_equal(out["image"], b["image"])
  np.testing.assert_array_equal(out["mix_weight"], np.ones(N))


def test_switch_probability_picks_cutmix_or_mixup_per_example():
  b = constant_batch(64)
  out = mix_batch(b, jax.random.key(3), transforms.AugmentSpec(
      mixup=0.8, cutmix=1.0, mix_switch_prob=0.5, mix_mode="elem"))
  img = np.asarray(out["image"])[..., 0]
  blended = [not np.isin(img[i], [i + 1, 64 - i]).all() for i in range(64)]
  assert 10 < sum(blended) < 54  # both families drawn


def test_soft_target_loss_is_the_lambda_weighted_pair_of_losses():
  logits = jax.random.normal(jax.random.key(4), (6, 10))
  batch = {"label": jnp.array([0, 1, 2, 3, 4, 5]), "mix_label": jnp.array([5, 4, 3, 2, 1, 0]),
           "mix_weight": jnp.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.5])}
  w = jnp.linspace(0.5, 2.0, 10)
  got = steps.mixed_cross_entropy(logits, batch, 10, 0.1, w)
  lam = batch["mix_weight"]
  one = steps.cross_entropy(logits, batch["label"], 10, 0.1) * w[batch["label"]]
  two = steps.cross_entropy(logits, batch["mix_label"], 10, 0.1) * w[batch["mix_label"]]
  # CE is linear in the targets; the weights combine with the same lambda.
  expected = (lam * steps.cross_entropy(logits, batch["label"], 10, 0.1)
              + (1 - lam) * steps.cross_entropy(logits, batch["mix_label"], 10, 0.1)) * (
                  lam * w[batch["label"]] + (1 - lam) * w[batch["mix_label"]])
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(got[0], one[0], rtol=1e-5)  # lambda 1: the plain weighted loss
  assert not np.allclose(got[1], two[1])
  np.testing.assert_array_equal(steps.accuracy_labels(batch), [0, 1, 2, 2, 1, 5])
  assert steps.accuracy_labels({"label": batch["label"]}) is batch["label"]


# ----------------------------------------------------------------------------- random erasing

AREA, RATIO = (0.02, 1 / 3), (0.3, 1 / 0.3)


def _box(mask):
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return rows, cols


def test_erase_mask_is_one_box_in_the_drawn_area_and_ratio_ranges():
  aug = transforms.AugmentSpec(random_erasing=1.0)
  u = np.random.default_rng(0).random((500, transforms.ERASE_ATTEMPTS, 4))
  host = transforms.erase_mask(u, 32, 40, aug)
  device = np.asarray(transforms.erase_mask(jnp.asarray(u, jnp.float32), 32, 40, aug, jnp))
  assert host.shape == (500, 32, 40)
  assert (host != device).any(axis=(1, 2)).mean() < 0.01  # float64 vs float32 uniforms only
  for m in host:
    rows, cols = _box(m)
    assert m.sum() == len(rows) * len(cols) > 0  # one filled box: this one always fits
    area = m.sum() / (32 * 40)
    # Rounded sides: the area and ratio ranges widen by at most one pixel per side.
    assert AREA[0] * 0.5 <= area <= AREA[1] * 1.5
    assert RATIO[0] * 0.5 <= len(rows) / len(cols) <= RATIO[1] * 2
    assert len(rows) < 32 and len(cols) < 40


@pytest.mark.parametrize("mode", ["pixel", "const"])
def test_random_erasing_covers_the_drawn_area_on_both_paths(mode):
  aug = transforms.AugmentSpec(random_erasing=1.0, erasing_mode=mode)
  x = jnp.full((16, H, W, 3), 7.0)  # no fill value equals 7
  out = np.asarray(random_erase(x, jax.random.key(5), aug))
  rng = np.random.default_rng(5)
  host = np.stack([transforms.random_erase(np.full((H, W, 3), 7.0, np.float32), rng, aug)
                   for _ in range(16)])
  for erased in (out, host):
    assert erased.dtype == np.float32 and erased.shape == (16, H, W, 3)
    for img in erased:
      m = (img != 7.0).all(axis=-1)
      rows, cols = _box(m)
      assert m.sum() == len(rows) * len(cols) > 0
      if mode == "const":
        assert (img[m] == 0).all()
  none = random_erase(x, jax.random.key(5), transforms.AugmentSpec())
  np.testing.assert_array_equal(none, x)  # probability 0
  half = random_erase(jnp.full((400, 8, 8, 1), 7.0), jax.random.key(6),
                                     transforms.AugmentSpec(random_erasing=0.25))
  share = float((np.asarray(half) != 7.0).any(axis=(1, 2, 3)).mean())
  assert 0.15 < share < 0.35  # ~25% of the images, binomial sd 2.2%


def test_prepare_with_every_family_is_keyed_by_step():
  spec = transforms.PreprocessSpec(image_size=(H, W))
  aug = transforms.AugmentSpec(auto="randaugment", auto_ops=("rotate", "solarize"),
                               random_erasing=0.5, mixup=0.8, cutmix=1.0)
  prepare = jax.jit(device_augment.make_prepare_fn(spec, aug, jax.random.key(9), seed=4))
  b = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, H, W, 1)), jnp.uint8),
       "label": jnp.arange(8)}
  a1, a2, other = prepare(b, 3), prepare(b, 3), prepare(b, 4)
  for key in ("image", "mix_label", "mix_weight"):
    np.testing.assert_array_equal(a1[key], a2[key])
  assert not np.array_equal(a1["image"], other["image"])
  assert a1["image"].dtype == jnp.float32 and a1["image"].shape == (8, H, W, 1)
  mix = device_augment.make_mix_fn(aug, jax.random.key(9))
  assert device_augment.make_mix_fn(transforms.AugmentSpec(), jax.random.key(9)) is None
  assert set(mix(b | {"image": b["image"].astype(jnp.float32)}, 3)) == {"image", "label",
                                                                         "mix_label",
                                                                         "mix_weight"}


@pytest.mark.parametrize("on_device", [True, False], ids=["device", "grain"])
def test_the_tensorboard_preview_shows_the_mixed_and_erased_batch(on_device):
  """TrainInput.preview (the train/augmented_batch grid) runs the step's own prepare: on the
  device path all of it, on the Grain path (batches arrive erased) the mixing."""
  from jaxclf.data.types import ArraySource, Split
  from jaxclf.train.inputs import TrainInput
  spec = transforms.PreprocessSpec(image_size=(H, W))
  aug = transforms.AugmentSpec(cutmix=1.0, mix_mode="elem", random_erasing=1.0,
                               erasing_mode="const")
  x = np.stack([np.full((H, W, 1), 10 * i + 5, np.uint8) for i in range(8)])
  labels = np.arange(8)
  ti = TrainInput(Split(ArraySource(x, labels), labels), spec, aug, 8, 1, 0, "shuffle",
                  on_device=on_device)
  batch = {"image": x if on_device else transforms.normalize(x, spec), "label": labels}
  shown = ti.preview(batch, jax.random.key(1), 3)
  prepared = jax.jit(ti.prepare_fn(jax.random.key(1)))(batch, 3)
  np.testing.assert_array_equal(shown, transforms.denormalize(np.asarray(prepared["image"]), spec))
  assert shown.dtype == np.uint8 and shown.shape == x.shape
  pasted = [np.isin(shown[i], [10 * (7 - i) + 5]).any() for i in range(8)]
  assert any(pasted)  # partners' boxes are in the grid
  if on_device:  # erased to the mean colour: the grey of preprocessing.mean
    mean_grey = transforms.denormalize(np.zeros((1, 1, 1, 1), np.float32), spec)[0, 0, 0, 0]
    assert all((shown[i] == mean_grey).any() for i in range(8))
