"""On-device augmentation (jaxclf/data/device_augment.py) against the host path's semantics, and
the in-memory batching that feeds it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.data import device_augment, pipeline, transforms
from jaxclf.data.types import ArraySource, Split

SPEC = transforms.PreprocessSpec()


def images(n=16, size=12, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1)).astype(np.uint8)


def test_normalize_is_bit_identical_to_the_host_transform():
  x = images()
  np.testing.assert_array_equal(np.asarray(device_augment.normalize(jnp.asarray(x), SPEC)),
                                transforms.normalize(x, SPEC))


def test_translate_is_an_edge_padded_crop_within_range():
  x = images()
  out = np.asarray(device_augment.augment(jnp.asarray(x), jax.random.key(0),
                                          transforms.AugmentSpec(translate=2)))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  offsets = set()
  for i in range(len(x)):
    hits = [(dy, dx) for dy in range(5) for dx in range(5)
            if np.array_equal(out[i], padded[i, dy:dy + 12, dx:dx + 12])]
    assert hits, f"example {i} is not a +-2 px crop of its padded image"
    offsets.add(hits[0])
  assert len(offsets) > 3  # offsets are drawn per example


def test_flip_mirrors_about_half_the_batch():
  x = images(64)
  out = np.asarray(device_augment.augment(jnp.asarray(x), jax.random.key(1),
                                          transforms.AugmentSpec(hflip=True)))
  same = [np.array_equal(o, i) for o, i in zip(out, x)]
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 16 <= sum(mirrored) <= 48


def test_rotation_by_small_angles_keeps_the_image_close_and_in_range():
  x = np.zeros((8, 15, 15, 1), np.uint8)
  x[:, 5:10, 5:10] = 200  # a centred square stays mostly in place under +-10 degrees
  out = np.asarray(device_augment.augment(jnp.asarray(x), jax.random.key(2),
                                          transforms.AugmentSpec(rotation=10.0)))
  assert out.shape == x.shape and out.min() >= 0 and out.max() <= 200 + 1e-3
  assert np.abs(out - x).mean() < 20 and not np.array_equal(out, x.astype(np.float32))
  zero = np.asarray(device_augment._rotate(jnp.asarray(x), jax.random.key(0), 0.0))
  np.testing.assert_allclose(zero, x, atol=1e-3)


def test_prepare_is_keyed_by_step_so_a_resume_redraws_the_same_batch():
  aug = transforms.AugmentSpec(translate=2, hflip=True)
  prepare = jax.jit(device_augment.make_prepare_fn(SPEC, aug, jax.random.key(3)))
  b = {"image": jnp.asarray(images()), "label": jnp.zeros(16, jnp.int32)}
  a1, a2, other = prepare(b, 5), prepare(b, 5), prepare(b, 6)
  np.testing.assert_array_equal(a1["image"], a2["image"])
  assert not np.array_equal(a1["image"], other["image"])
  assert a1["image"].dtype == jnp.float32


def test_host_only_augmentations_are_refused_by_name():
  assert not device_augment.supports(transforms.AugmentSpec(random_resized_crop=True))
  with pytest.raises(ValueError, match="brightness"):
    device_augment.make_prepare_fn(SPEC, transforms.AugmentSpec(brightness=0.2), jax.random.key(0))


def test_in_memory_batches_cover_each_example_once_per_epoch_and_resume_mid_epoch():
  x, labels = images(100, 28), np.arange(100) % 10
  split = Split(ArraySource(x, labels), labels)
  assert pipeline.in_memory_pixels(split, SPEC) is x
  assert pipeline.in_memory_pixels(split, transforms.PreprocessSpec(image_size=(32, 32))) is None
  order = pipeline.epoch_order(labels, epoch=1, seed=0)
  assert sorted(order) == list(range(100))
  assert not np.array_equal(order, pipeline.epoch_order(labels, epoch=2, seed=0))
  batches = list(pipeline.array_batches(x, labels, order, 32))
  assert len(batches) == 3  # drop_remainder
  resumed = list(pipeline.array_batches(x, labels, order, 32, start=1))
  for a, b in zip(batches[1:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  evals = list(pipeline.array_eval_batches(x, labels, 32))
  assert [len(b["label"]) for b in evals] == [32] * 4
  assert (np.concatenate([b["label"] for b in evals]) >= 0).sum() == 100
