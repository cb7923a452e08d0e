"""RandAugment / TrivialAugment (jaxclf/data/autoaugment.py): what each op means at its magnitude,
that ops keep dtype, shape and range, and that the Grain path and the device path give an
example the same ops.

Tolerance between the paths: both run the same float32 formulas, rounded to the uint8 grid after
every op. XLA may fuse a multiply and an add (one rounding instead of two) and its cos/sin may
differ from numpy's in the last bit, so a value that lies within an ulp of a rounding boundary
can land one grey level apart: one op, fed the same input, agrees within 1 level. In a chain, a
later quantising op (posterize, solarize's threshold) can turn such a rare one-level difference
into a larger one on that pixel, so whole chains are held to a mean difference below 1 level.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxclf.config import validate
from jaxclf.config.defaults import default_config
from jaxclf.config.validate import ConfigError
from jaxclf.data import autoaugment, device_augment, pipeline, transforms
from jaxclf.data.types import ArraySource, Split

GREY = transforms.PreprocessSpec(image_size=(12, 12))
RGB = transforms.PreprocessSpec(image_size=(12, 12), channels=3, mean=(0.5, 0.4, 0.3),
                                std=(0.25, 0.25, 0.25))
RAND = transforms.AugmentSpec(auto="randaugment")
# Ops whose magnitude 0 is the unchanged image under timm's increasing scales (inc1).
IDENTITY_AT_ZERO = ("identity", "rotate", "solarize", "color", "contrast", "brightness",
                    "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def images(n=4, size=12, channels=1, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels)).astype(np.uint8)


def host_op(name, x, m, sign=1.0, aug=RAND, spec=GREY):
  return autoaugment.apply_op(name, np.asarray(x, np.float32), np.float32(m), np.float32(sign),
                              aug, autoaugment.fill_value(spec), np)


def device_op(name, x, m, sign=1.0, aug=RAND, spec=GREY):
  return np.asarray(autoaugment.apply_op(
      name, jnp.asarray(x, jnp.float32), jnp.float32(m), jnp.float32(sign), aug,
      jnp.asarray(autoaugment.fill_value(spec)), jnp))


def test_the_default_config_lists_every_op():
  assert tuple(default_config().augment.auto_ops) == autoaugment.OPS


@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
def test_magnitude_zero_is_the_identity(name):
  x = images(1, 12, 3)[0]
  for sign in (1.0, -1.0):
    np.testing.assert_array_equal(host_op(name, x, 0.0, sign, spec=RGB), x)
    np.testing.assert_array_equal(device_op(name, x, 0.0, sign, spec=RGB), x)


def test_ops_at_full_magnitude_mean_what_the_docs_say():
  x = images(1, 20, 1)[0].astype(np.float32)
  np.testing.assert_array_equal(host_op("solarize", x, 10), 255 - x)  # threshold 0: all inverted
  np.testing.assert_array_equal(host_op("posterize", x, 10), 0 * x)  # 0 bits kept
  np.testing.assert_array_equal(host_op("posterize", x, 0), x // 16 * 16)  # 4 bits at m = 0
  np.testing.assert_array_equal(host_op("brightness", x, 10, -1.0), np.floor(x * 0.1 + 0.5))
  # Translate by 0.45 of the side = 9 px of 20: column j shows the input's column j + 9.
  shifted = host_op("translate_x", x, 10, 1.0)
  np.testing.assert_array_equal(shifted[:, :11], x[:, 9:])
  assert (shifted[:, 11:] == autoaugment.fill_value(GREY)).all()
  spread = np.full((4, 4, 1), 100.0)
  spread[0, 0], spread[1, 1] = 120.0, 110.0
  stretched = host_op("auto_contrast", spread, 5)
  assert (stretched.min(), stretched.max()) == (0.0, 255.0)
  two = np.zeros((32, 32, 1), np.float32)  # PIL: step = (1024 - 512) // 255 = 2
  two[:16] = 200.0
  np.testing.assert_array_equal(np.unique(host_op("equalize", two, 5)), [0.0, 255.0])


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
@pytest.mark.parametrize("increasing", [True, False])
def test_every_op_keeps_dtype_shape_and_range(spec, increasing):
  aug = dataclasses.replace(RAND, auto_increasing=increasing)
  x = images(1, 12, spec.channels)[0]
  for name in autoaugment.OPS:
    for m in (0.0, 3.3, 10.0):
      for out in (host_op(name, x, m, -1.0, aug, spec), device_op(name, x, m, -1.0, aug, spec)):
        assert out.dtype == np.float32 and out.shape == x.shape, name
        assert out.min() >= 0 and out.max() <= 255 and (out == np.floor(out)).all(), name
      np.testing.assert_allclose(device_op(name, x, m, 1.0, aug, spec),
                                 host_op(name, x, m, 1.0, aug, spec), atol=1, err_msg=name)
  one = autoaugment.augment_example(x, aug, spec, seed=3, step=5, row=2)
  assert one.dtype == np.uint8 and one.shape == x.shape


def test_the_draw_is_the_same_in_numpy_and_jax_and_follows_the_spec():
  rows = np.arange(4096)
  for aug in (RAND, dataclasses.replace(RAND, auto_magnitude_std=101.0),
              transforms.AugmentSpec(auto="trivialaugment", auto_magnitude=10.0)):
    host = autoaugment.draw(11, 7, rows, aug, np)
    device = jax.jit(lambda s, r, aug=aug: autoaugment.draw(11, s, r, aug, jnp))(7, rows)
    for field in ("op", "applied", "sign"):
      np.testing.assert_array_equal(getattr(host, field), np.asarray(getattr(device, field)))
    # One float32 multiply-add apart at most (m + std * z).
    np.testing.assert_allclose(host.magnitude, np.asarray(device.magnitude), rtol=0, atol=1e-5)
    layers = 1 if aug.auto == "trivialaugment" else aug.auto_num_ops
    assert host.op.shape == (4096, layers)
    assert set(np.unique(host.op)) == set(range(len(aug.auto_ops)))
    assert host.magnitude.min() >= 0 and host.magnitude.max() <= 10
  trivial = autoaugment.draw(11, 7, rows, transforms.AugmentSpec(auto="trivialaugment"), np)
  assert trivial.applied.all()
  assert 0.45 < autoaugment.draw(11, 7, rows, RAND).applied.mean() < 0.55  # auto_prob 0.5
  # Another step or seed: other ops.
  op = autoaugment.draw(11, 7, rows, RAND).op
  assert not np.array_equal(autoaugment.draw(11, 8, rows, RAND).op, op)
  assert not np.array_equal(autoaugment.draw(12, 7, rows, RAND).op, op)


def test_grain_and_device_paths_give_an_example_the_same_ops():
  """Grain's batch at global step s, row r: the ops the device path draws for (seed, s, r)."""
  n, batch, seed, epoch = 48, 8, 7, 1
  x = images(n, 12, 3, seed=1)
  labels = np.arange(n)  # the label names the record: the device path can rebuild the batch
  split = Split(ArraySource(x, labels), labels)
  aug = dataclasses.replace(RAND, auto_num_ops=3, auto_prob=0.9)
  transform = pipeline.TrainTransform(RGB, aug, 10**7)
  ds = pipeline.train_dataset(split, epoch=epoch, seed=seed, batch_size=batch, transform=transform)
  steps_per_epoch = n // batch
  on_device = jax.jit(lambda images, step: device_augment.auto_augment(images, aug, RGB, seed,
                                                                       step))
  for k in range(len(ds)):
    b = ds[k]
    grain = transforms.denormalize(b["image"], RGB).astype(np.float32)
    device = np.asarray(on_device(x[b["label"]], epoch * steps_per_epoch + k))
    assert np.abs(grain - device).mean() < 1, k
    assert np.abs(grain - x[b["label"]]).mean() > 10, k  # and the ops did change the batch
  # And the same record at another step gets other ops: the key is the slot, not the image.
  assert not np.array_equal(ds[0]["image"], pipeline.train_dataset(
      split, epoch=epoch + 1, seed=seed, batch_size=batch, transform=transform)[0]["image"])


def test_grain_positions_follow_the_batches_dealt_to_each_process():
  """Process p of n reads local batches p, p + n, ... (inputs.TrainInput): global step
  k // n, rows p * batch .. of the global batch."""
  tag = pipeline._Position(seed=5, first_step=100, batch_size=4, process_count=2)
  record = {"image": None, "label": 0}
  assert tag(0, record)[pipeline.EXAMPLE_KEY] == (5, 100, 0)
  assert tag(6, record)[pipeline.EXAMPLE_KEY] == (5, 100, 6)  # local batch 1: process 1's rows
  assert tag(9, record)[pipeline.EXAMPLE_KEY] == (5, 101, 1)  # local batch 2: step 101, process 0


def test_grain_auto_augment_is_the_same_batch_split_over_processes():
  """Two processes' local Grain batches, stacked, are the one-process batch: each example's
  ops follow its global (step, row), whichever process reads it."""
  from jaxclf.train.inputs import TrainInput
  x, labels = images(64, 12, 3, seed=2), np.arange(64)
  split = Split(ArraySource(x, labels), labels)
  aug = dataclasses.replace(RAND, random_erasing=0.5)

  def batches(p, n):
    ti = TrainInput(split, RGB, aug, 16, 4, 0, "shuffle", on_device=False, read_threads=0,
                    prefetch=1, grain_transform=pipeline.TrainTransform(RGB, aug, 10**7),
                    process_index=p, process_count=n)
    stream = ti.stream(2, 7, None, None)  # across an epoch boundary
    return [next(stream) for _ in range(5)]

  whole, parts = batches(0, 1), [batches(p, 2) for p in (0, 1)]
  for full, first, second in zip(whole, *parts):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), full[key])


RANDOM_SPECS = given(
    mode=st.sampled_from(["randaugment", "trivialaugment"]),
    ops=st.lists(st.sampled_from(autoaugment.OPS), min_size=1, max_size=5, unique=True),
    num_ops=st.integers(1, 3), magnitude=st.floats(0, 10),
    mstd=st.sampled_from([0, 0.5, 3, 101]),
    prob=st.floats(0, 1), increasing=st.booleans(), rgb=st.booleans(),
    seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10**6))
# Each example is a new op list, so the device path compiles afresh (about 2 s each): the
# default suite draws 4, the slow run 40.
FEW, MANY = (settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
             for n in (4, 40))


@FEW
@RANDOM_SPECS
def test_random_specs_on_random_images_through_both_paths(**spec):
  check_both_paths(**spec)


@pytest.mark.slow  # 40 random specs, each compiled afresh
@MANY
@RANDOM_SPECS
def test_many_random_specs_through_both_paths(**spec):
  check_both_paths(**spec)


def check_both_paths(mode, ops, num_ops, magnitude, mstd, prob, increasing, rgb, seed, step):
  spec = RGB if rgb else GREY
  aug = transforms.AugmentSpec(auto=mode, auto_ops=tuple(ops), auto_num_ops=num_ops,
                               auto_magnitude=magnitude, auto_magnitude_std=mstd, auto_prob=prob,
                               auto_increasing=increasing)
  x = images(4, 12, spec.channels, seed=step % 1000)
  device = np.asarray(device_augment.auto_augment(jnp.asarray(x), aug, spec, seed, step))
  host = np.stack([autoaugment.augment_example(im, aug, spec, seed, step, i)
                   for i, im in enumerate(x)])
  assert host.dtype == np.uint8 and host.shape == x.shape == device.shape
  assert device.min() >= 0 and device.max() <= 255
  assert np.abs(host.astype(np.float32) - device).mean() < 1
  # Layer by layer from the same input, each op agrees within one grey level.
  d = autoaugment.draw(seed, step, np.arange(4), aug)
  fill = autoaugment.fill_value(spec)
  for i in range(4):
    h = x[i].astype(np.float32)
    for layer in np.flatnonzero(d.applied[i]):
      name, m, s = ops[d.op[i, layer]], d.magnitude[i, layer], d.sign[i, layer]
      nxt = autoaugment.apply_op(name, h, m, s, aug, fill, np)
      dev = np.asarray(autoaugment.apply_op(name, jnp.asarray(h), jnp.float32(m), jnp.float32(s),
                                            aug, jnp.asarray(fill), jnp))
      assert np.abs(nxt - dev).max() <= 1, name
      h = nxt


def test_augment_config_errors_name_the_field():
  def check(overrides, match):
    c = default_config()
    for key, value in overrides.items():
      section, field = key.split(".")
      c[section][field] = value
    with pytest.raises(ConfigError, match=match):
      validate(c)

  check({"augment.auto": "randaugmnet"}, r"augment\.auto: .*Did you mean 'randaugment'")
  check({"augment.auto_ops": ("rotate", "sheer_x")}, r"augment\.auto_ops: 'sheer_x' is not an "
        r"op\. Did you mean 'shear_x'\?")
  check({"augment.auto_magnitude": 12.0}, r"augment\.auto_magnitude: 12\.0 is out of range")
  check({"augment.mixup": 0.8, "train.batch_size": 1}, r"augment\.mixup: .*train\.batch_size=1")
  check({"augment.cutmix": 1.0, "train.batch_size": 1}, r"augment\.cutmix: ")
  check({"augment.erasing_area": (0.5, 0.1)}, r"augment\.erasing_area: need two numbers")
  check({"augment.mix_mode": "pair"}, r"augment\.mix_mode: 'pair' is not one of")
  c = default_config()
  c.augment.auto, c.augment.mixup, c.augment.random_erasing = "trivialaugment", 0.8, 0.25
  validate(c)
