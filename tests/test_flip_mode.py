"""augment.hflip_mode: 'random' (a coin per example and epoch) and 'alternate' (airbench's
derandomised flip: a seeded coin in epoch 0, then the opposite of the epoch before), on the
device path (flags computed on the host, applied in the jitted step) and the Grain path (each
record tagged before the shuffle). The label of every record here is its index, so a batch
names the examples it holds and which of them came out mirrored."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.config import ConfigError, default_config, validate
from jaxclf.data import device_augment, pipeline, transforms
from jaxclf.data.types import ArraySource, Split
from jaxclf.train.inputs import TrainInput

N, BATCH, SEED, EPOCHS = 64, 16, 3, 3
SPEC = transforms.PreprocessSpec(image_size=(8, 8))
# Random pixels: no image equals its own mirror, so "mirrored" is never ambiguous.
X = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 1)).astype(np.uint8)
LABELS = np.arange(N)
SPLIT = Split(ArraySource(X, LABELS), LABELS)
ALTERNATE = transforms.AugmentSpec(hflip=True, hflip_mode="alternate")


def train_input(aug, on_device, process_index=0, process_count=1) -> TrainInput:
  return TrainInput(SPLIT, SPEC, aug, BATCH, N // BATCH, SEED, "shuffle", on_device=on_device,
                    grain_transform=pipeline.TrainTransform(SPEC, aug, 10**7), read_threads=0,
                    prefetch=1, process_index=process_index, process_count=process_count)


def mirrored(images, labels) -> np.ndarray:
  """Whether each uint8 image is its record's mirror image (asserting it is that or the record)."""
  out = []
  for im, label in zip(images, labels):
    flipped = np.array_equal(im, X[label][:, ::-1])
    assert flipped or np.array_equal(im, X[label]), f"record {label} is neither itself nor mirrored"
    out.append(flipped)
  return np.array(out)


@functools.cache
def trained_flips(on_device: bool) -> np.ndarray:
  """bool [EPOCHS, N]: which examples the training input showed mirrored in each epoch (what
  the step's input is, after the device path's `prepare`)."""
  ti = train_input(ALTERNATE, on_device)
  spe = ti.steps_per_epoch
  prepare = jax.jit(ti.prepare_fn(jax.random.key(0))) if on_device else None
  flips, seen = np.zeros((EPOCHS, N), bool), np.zeros((EPOCHS, N), int)
  stream = ti.stream(0, EPOCHS * spe, None, None)
  for step in range(EPOCHS * spe):
    batch = next(stream)
    images = batch["image"] if prepare is None else prepare(batch, step)["image"]
    labels = np.asarray(batch["label"])
    flips[step // spe, labels] = mirrored(transforms.denormalize(np.asarray(images), SPEC), labels)
    seen[step // spe, labels] += 1
  assert (seen == 1).all()  # every example once per epoch: the table is complete
  return flips


@pytest.mark.parametrize("on_device", [True, False], ids=["device", "grain"])
def test_alternate_shows_every_example_once_each_way_over_two_epochs(on_device):
  flips = trained_flips(on_device)
  for e in range(EPOCHS - 1):
    assert (flips[e] ^ flips[e + 1]).all(), f"epochs {e} and {e + 1}"


def test_both_paths_flip_the_same_examples_as_the_pure_function():
  expected = np.stack([transforms.alternate_hflips(SEED, LABELS, e) for e in range(EPOCHS)])
  np.testing.assert_array_equal(trained_flips(True), expected)
  np.testing.assert_array_equal(trained_flips(False), expected)


def test_first_epoch_flips_about_half_and_depends_on_the_seed():
  n = 20_000
  bound = 5 * np.sqrt(n * 0.25)  # 5 binomial standard deviations of Binomial(n, 1/2)
  first = {seed: transforms.alternate_hflips(seed, np.arange(n), 0) for seed in (0, 1, 7)}
  for seed, flips in first.items():
    assert abs(int(flips.sum()) - n / 2) <= bound, seed
  # Another seed is another coin: the two agree on about half of the examples, not all.
  assert abs(int((first[0] == first[1]).sum()) - n / 2) <= bound
  # Resume needs nothing but (seed, index, epoch): one index alone gives its row of the array.
  assert transforms.alternate_hflips(0, 123, 4) == first[0][123]
  assert transforms.alternate_hflips(0, 123, 5) != first[0][123]


@pytest.mark.parametrize("on_device", [True, False], ids=["device", "grain"])
def test_processes_flip_by_the_global_example_index(on_device):
  """Two processes' local batches, stacked, are the one-process batch, flags included."""
  def batches(p, n):
    stream = train_input(ALTERNATE, on_device, p, n).stream(2, 7, None, None)  # over epoch 0 | 1
    return [next(stream) for _ in range(5)]

  whole, parts = batches(0, 1), [batches(p, 2) for p in (0, 1)]
  for full, first, second in zip(whole, *parts):
    assert set(full) == ({"image", "label", "hflip"} if on_device else {"image", "label"})
    for key in full:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), full[key])


def test_device_path_resumes_mid_epoch_with_the_same_flags():
  ti = train_input(ALTERNATE, True)
  whole = ti.stream(0, 8, None, None)
  uninterrupted = [next(whole) for _ in range(8)][5:]
  resumed = ti.stream(5, 8, None, None)
  for a in uninterrupted:
    b = next(resumed)
    np.testing.assert_array_equal(a["hflip"], b["hflip"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_the_preview_grid_shows_the_alternating_flips():
  ti = train_input(ALTERNATE, True)
  batch = next(ti.stream(0, 1, None, None))
  shown = ti.preview(batch, jax.random.key(0), 0)
  np.testing.assert_array_equal(mirrored(shown, batch["label"]), batch["hflip"])


# Random mode's flips, computed with the code as it was before hflip_mode existed (same seeds,
# same calls): the option must leave them, and the compiled default step, unchanged.
RANDOM_DEVICE_FLIPS = "316ccea7c1c1aac8"  # device_augment.augment, key 0, rows 0..63
RANDOM_GRAIN_FLIPS = "3c8a8ea12b91cbb8"  # train_dataset(seed=3, epoch=1), records 0..63


@pytest.mark.parametrize("aug", [transforms.AugmentSpec(hflip=True),
                                 transforms.AugmentSpec(hflip=True, hflip_mode="random")],
                         ids=["default", "explicit"])
def test_random_mode_flips_as_before(aug):
  out = np.asarray(jax.jit(lambda im: device_augment.augment(im, jax.random.key(0), aug))(
      jnp.asarray(X)))
  assert np.packbits(mirrored(out, LABELS)).tobytes().hex() == RANDOM_DEVICE_FLIPS
  ds = pipeline.train_dataset(SPLIT, epoch=1, seed=3, batch_size=8,
                              transform=pipeline.TrainTransform(SPEC, aug, 10**7))
  grain = np.zeros(N, bool)
  for k in range(len(ds)):
    b = ds[k]
    grain[b["label"]] = mirrored(transforms.denormalize(b["image"], SPEC), b["label"])
  assert np.packbits(grain).tobytes().hex() == RANDOM_GRAIN_FLIPS


def test_alternate_without_its_flags_is_an_error_not_a_coin():
  prepare = device_augment.make_prepare_fn(SPEC, ALTERNATE, jax.random.key(0))
  with pytest.raises(ValueError, match="augment.hflip_mode=alternate: the batch has no 'hflip'"):
    prepare({"image": jnp.asarray(X), "label": jnp.asarray(LABELS)}, 0)
  with pytest.raises(ValueError, match="augment.hflip_mode=alternate: the example's flip"):
    transforms.augment(X[0], np.random.default_rng(0), SPEC, ALTERNATE)


@pytest.mark.parametrize("settings, message", [
    ({"hflip_mode": "alternating"},
     r"augment.hflip_mode: 'alternating' is not one of \['random', 'alternate'\]"),
    ({"hflip_mode": "alternate", "hflip": False},
     r"augment.hflip_mode: 'alternate' .* needs augment.hflip=true"),
], ids=["unknown-mode", "alternate-without-hflip"])
def test_validation_names_the_key_and_its_values(settings, message):
  cfg = default_config()
  cfg.augment.update(settings)
  with pytest.raises(ConfigError, match=message):
    validate(cfg)


def test_alternate_with_hflip_validates_and_the_spec_checks_the_mode():
  cfg = default_config()
  cfg.augment.hflip_mode = "alternate"
  validate(cfg)
  assert transforms.AugmentSpec.from_config(cfg.augment).alternating_hflip
  with pytest.raises(ValueError, match="augment.hflip_mode must be one of"):
    transforms.AugmentSpec(hflip_mode="alternating")


@pytest.mark.slow
@pytest.mark.parametrize("on_device", ["true", "false"], ids=["device", "grain"])
def test_kill9_resume_is_exact_with_alternating_flips(tmp_path, on_device):
  """The resume contract with the flips that depend on the epoch, on either input path: kill -9,
  rerun the same command, end bit-identical to an uninterrupted run."""
  from resume_check import assert_kill9_resume_is_exact
  from test_train import _assert_same_weights, _run_cli
  extra = ("--config.augment.hflip=true", "--config.augment.hflip_mode=alternate",
           f"--config.data.on_device={on_device}")
  ref_dir, cut_dir, ref, _ = assert_kill9_resume_is_exact(
      tmp_path, lambda w: _run_cli(w, extra, model="cnn_tiny"), final_step=96)
  assert ref["config"]["augment.hflip_mode"] == "alternate"
  assert ref["model"]["input_path"] == ("on_device" if on_device == "true" else "grain")
  _assert_same_weights(ref_dir, cut_dir)
