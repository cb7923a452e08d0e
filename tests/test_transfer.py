"""Fine-tuning schedule on real runs: a frozen backbone (weights and BatchNorm statistics
bit-identical) that unfreezes, another run as pretrained weights, the frozen-feature cache, the
sha256 pin and run.json's provenance, the stratified train subset."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxclf.config import load_config, validate
from jaxclf.config.validate import ConfigError
from jaxclf.data.dataset import DataError, load_dataset
from jaxclf.models import param_groups
from jaxclf.models.pretrained import PretrainedError
from jaxclf.train.checkpoints import load_inference
from jaxclf.train.loop import train_and_evaluate
from jaxclf.train.pretrained_init import check_pin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_END_EVALS = ["evals.test.enabled=false", "train.calibrate=false"]


def tiny(*overrides):
  return load_config(f"{ROOT}/configs/cnn.py:tiny", overrides=[*NO_END_EVALS, *overrides],
                     environ={})


def flat(variables):
  return {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(jax.device_get(variables))).items()}


def split_groups(variables, model="cnn_tiny"):
  """(backbone arrays incl. BatchNorm statistics, head arrays) by param group."""
  out = ({}, {})
  for k, v in flat(variables).items():
    out[param_groups.group_of(model, (k.split("/")[1],)) == "head"][k] = v
  return out


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A 1-epoch tiny CNN run (8 steps): the 'pretrained' weights of the runs below."""
  workdir = str(tmp_path_factory.mktemp("source"))
  train_and_evaluate(tiny("train.num_epochs=1"), workdir)
  return workdir


# Augmentation off, so that the feature cache (un-augmented by design) can be compared with it.
FROZEN = ["train.freeze_backbone_epochs=1", "optimizer.lr_mults=backbone=0.1",
          "augment.translate=0", "augment.hflip=false"]


@pytest.fixture(scope="module")
def frozen_run(source_run, tmp_path_factory):
  """source_run as pretrained, 1 of 2 epochs frozen, stopped at the phase boundary (step 8).
  -> (workdir, run.json, the step-8 variables)."""
  workdir = str(tmp_path_factory.mktemp("ft"))
  record = train_and_evaluate(tiny(f"model.pretrained={source_run}", *FROZEN,
                                   "train.max_steps=8"), workdir)
  return workdir, record, load_inference(workdir, "latest").variables


def test_frozen_epochs_keep_backbone_and_bn_statistics_bit_identical_then_both_train(
    source_run, frozen_run):
  """Must show: after K frozen epochs the backbone's params and BatchNorm statistics equal the
  pretrained ones bit for bit (the head trained); after unfreezing both change. The second
  segment is a resume at the phase boundary: the phase follows from the restored step."""
  pre_bb, pre_head = split_groups(load_inference(source_run, "best").variables)
  assert any("batch_stats" in k for k in pre_bb)
  workdir, record, frozen = frozen_run
  assert record["model"]["pretrained"]["kind"] == "run"
  assert record["model"]["pretrained"]["head"] == "loaded"  # same classes: its head continues
  frozen_bb, frozen_head = split_groups(frozen)
  assert sorted(frozen_bb) == sorted(pre_bb)
  for k in pre_bb:
    assert np.array_equal(frozen_bb[k], pre_bb[k]), k
  assert any(not np.array_equal(frozen_head[k], pre_head[k]) for k in pre_head)

  resumed = train_and_evaluate(tiny(f"model.pretrained={source_run}", *FROZEN), workdir)  # at 8
  assert resumed["resumed_from_step"] == 8
  assert resumed["model"]["pretrained"] == record["model"]["pretrained"]  # kept across segments
  final = load_inference(workdir, "latest")
  assert final.step == 16
  bb, _ = split_groups(final.variables)
  for k in pre_bb:
    if k.endswith(("kernel", "mean", "var")):
      assert not np.array_equal(bb[k], pre_bb[k]), k


def test_feature_cache_trains_the_same_head_as_the_frozen_image_step(source_run, frozen_run,
                                                                    tmp_path):
  """train.cache_frozen_features: the head trained on cached (un-augmented) features equals the
  head the frozen image step trains with augmentation off, within float tolerance."""
  cached = str(tmp_path / "cached")
  record = train_and_evaluate(tiny(f"model.pretrained={source_run}", *FROZEN, "train.max_steps=8",
                                   "train.cache_frozen_features=true"), cached)
  assert record["feature_cache"]["images"] == 512 and record["feature_cache"]["head"] == "Dense_0"
  a_bb, a_head = split_groups(frozen_run[2])
  b_bb, b_head = split_groups(load_inference(cached, "latest").variables)
  for k in a_bb:
    assert np.array_equal(a_bb[k], b_bb[k]), k
  for k in a_head:
    np.testing.assert_allclose(b_head[k], a_head[k], rtol=1e-4, atol=1e-5, err_msg=k)
  pre_head = split_groups(load_inference(source_run, "best").variables)[1]
  assert any(not np.allclose(b_head[k], pre_head[k]) for k in pre_head)  # it did train


@pytest.mark.slow  # compiles an EfficientNet train step (~40 s of CPU)
def test_efficientnet_run_as_pretrained_replaces_the_head_for_new_classes(tmp_path):
  """Another EfficientNet run as the starting point: every backbone array and BatchNorm
  statistic comes from it; the classifier is kept fresh when the classes differ."""
  from jaxclf.models.registry import create_model
  from jaxclf.train.pretrained_init import load_run
  src = str(tmp_path / "effnet")
  train_and_evaluate(tiny("model.name=efficientnet_tiny", "train.max_steps=1",
                          "evals.val.when=1 steps", "train.batch_size=32"), src)
  other = flat(load_inference(src, "latest").variables)
  model = create_model("efficientnet_tiny", 3)
  fresh = jax.jit(lambda: model.init(jax.random.key(1), np.zeros((1, 28, 28, 1)), train=False))()
  out = flat(load_run(src, "efficientnet_tiny", fresh, ["a", "b", "c"]))
  fresh = flat(fresh)
  for k, v in out.items():
    if "/classifier/" in k:
      assert np.array_equal(v, fresh[k]) and v.shape[-1] == 3
    else:
      assert np.array_equal(v, other[k]), k


def test_sha256_pin_mismatch_names_file_expected_and_actual(tmp_path, caplog):
  path = tmp_path / "w.npz"
  path.write_bytes(b"weights")
  actual = hashlib.sha256(b"weights").hexdigest()
  with pytest.raises(PretrainedError) as e:
    check_pin(str(path), str(path), "ab" * 32)
  assert str(path) in str(e.value) and "ab" * 32 in str(e.value) and actual in str(e.value)
  assert check_pin(str(path), str(path), actual.upper()) == actual
  with caplog.at_level(logging.INFO, logger="jaxclf.train"):
    assert check_pin(str(path), str(path), "") == actual
  assert actual in caplog.text and "not pinned" in caplog.text
  with pytest.raises(ConfigError, match="model.pretrained_sha256: expected 64 hex"):
    validate(tiny("model.pretrained=x.npz", "model.pretrained_sha256=abc"))
  with pytest.raises(ConfigError, match="model.pretrained is empty"):
    validate(tiny("model.pretrained_sha256=" + actual))
  with pytest.raises(ConfigError, match="cache_frozen_features .* needs train.freeze"):
    validate(tiny("train.cache_frozen_features=true"))
  with pytest.raises(ConfigError, match="train.freeze_backbone_epochs=3 is more than"):
    validate(tiny("train.freeze_backbone_epochs=3"))


def test_limit_per_class_is_stratified_seeded_nested_and_train_only():
  def load(n, seed=0):
    c = tiny(f"data.limit_per_class={n}", f"data.split_seed={seed}", "data.limit_per_split=0")
    return load_dataset(c.data)

  def rows(split):
    return [hashlib.sha1(x.tobytes()).hexdigest() for x in split.source.images]

  full, ten, fifty = load(0), load(10), load(50)
  train = ten.split("train")
  assert np.bincount(train.labels, minlength=10).tolist() == [10] * 10
  assert np.array_equal(train.source.labels, train.labels)
  assert np.array_equal(load(10).split("train").source.images, train.source.images)  # seeded
  assert not np.array_equal(load(10, seed=1).split("train").source.images, train.source.images)
  assert set(rows(train)) <= set(rows(fifty.split("train")))  # nested: 10 per class within 50
  assert set(rows(train)) <= set(rows(full.split("train")))
  for name in ("val", "test"):  # untouched, so the subset stays disjoint from them
    assert np.array_equal(ten.split(name).source.images, full.split(name).source.images)
  assert ten.version != full.version and ten.version != fifty.version
  with pytest.raises(DataError, match=r"limit_per_class=7000: .* 10 class\(es\): T-shirt/top"):
    load(7000)
  with pytest.raises(ConfigError, match="data.limit_per_class"):
    validate(tiny("data.limit_per_class=-1"))


def test_models_import_nothing_from_the_trainer():
  """models/ are plain modules: run-as-pretrained lives in jaxclf/train/pretrained_init.py."""
  import ast
  import glob
  for path in glob.glob(os.path.join(ROOT, "jaxclf", "models", "*.py")):
    tree = ast.parse(open(path).read())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.startswith("jaxclf.train")], path


@pytest.mark.parametrize("n,k,stride", [(8, 3, 2), (7, 5, 2), (15, 5, 1)])
def test_depthwise_taps_equal_the_grouped_convolution(n, k, stride):
  """EfficientNet's depthwise convs run as taps on CPU (bench/lite0_step.py): same 'SAME'
  padding, outputs and gradients as lax's grouped convolution, same parameter shape."""
  import flax.linen as nn
  import jax.numpy as jnp
  from jaxclf.models.efficientnet import DepthwiseConv, depthwise_taps
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, n, n, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 1, 6)), jnp.float32)

  def ref(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", feature_group_count=6,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  np.testing.assert_allclose(depthwise_taps(x, w, stride), ref(x, w), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda x, w: (ref(x, w) ** 2).sum(), (0, 1))(x, w)
  g = jax.grad(lambda x, w: (depthwise_taps(x, w, stride) ** 2).sum(), (0, 1))(x, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
  mine = DepthwiseConv(k, stride).init(jax.random.key(0), x)["params"]["kernel"]
  flax_conv = nn.Conv(6, (k, k), stride, "SAME", feature_group_count=6, use_bias=False).init(
      jax.random.key(0), x)["params"]["kernel"]
  assert mine.shape == flax_conv.shape == (k, k, 1, 6)


@pytest.mark.parametrize("variant,per_class", [("", 200), ("few_shot", 10)])
def test_transfer_configs_are_the_curves_measured_points(variant, per_class, monkeypatch):
  """configs/transfer.py (2,000 images) and :few_shot (100) are the pretrained arm of
  bench/transfer_curve.py at those sizes, so their docstring's measured figures are theirs."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
  import transfer_curve  # noqa: PLC0415
  bench = flat_config(transfer_curve.arm_config("pretrained", per_class, 0, 12, 64, False))
  config = flat_config(load_config(f"{ROOT}/configs/transfer.py:{variant}", environ={}))
  run_only = ("seed", "data.split_seed", "train.calibrate", "evals.test.enabled",
              "train.progress_bar", "evals.calibration.enabled")  # bookkeeping, not the recipe
  diff = {k: (config.get(k), v) for k, v in bench.items()
          if k not in run_only and k != "name" and config.get(k) != v}
  assert not diff, diff
  assert config["train.freeze_batchnorm"] and config["train.freeze_backbone_epochs"] == 2


def flat_config(c):
  return traverse_util.flatten_dict(c.to_dict(), sep=".")
