"""`jaxclf weights inspect | convert` (jaxclf/models/weights.py): torchvision layouts against the Flax
trees, the .npz that model.pretrained loads, and bad input in every format (malicious pickles,
truncated files, lying safetensors headers, the wrong architecture), each one clear error naming
the file. Parity with PyTorch itself: tests/test_weights_parity.py.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.cli import main as cli_main
from jaxclf.models import create_model
from jaxclf.models.pretrained import load_pretrained
from jaxclf.models.state_dict import LEGACY_MAGIC, LEGACY_PROTOCOL, PretrainedError
from jaxclf.models.weights import (ARCHS, META_KEY, convert_file, convert_torchvision,
                                   pretrained_provenance, read_safetensors, torchvision_layout)


def run_cli(capsys, *argv):
  """(exit code, stdout, stderr) of `jaxclf ARGV` run in this process."""
  rc = cli_main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.startswith("jaxclf: error:")]
  assert len(lines) == 1, err
  assert "Traceback" not in err
  return lines[0]


def layout_state(arch, seed=0, dtype=np.float32):
  """Random arrays in torchvision's exact key layout and shapes (classifier keys: any shape)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, (shape, _) in torchvision_layout(arch).items():
    if key.endswith("num_batches_tracked"):
      out[key] = np.array(3, np.int64)
    else:
      out[key] = rng.normal(size=shape or (4, 2)).astype(dtype)
  return out


def write_safetensors(path, header: dict, data: bytes, header_len: int | None = None):
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write((len(raw) if header_len is None else header_len).to_bytes(8, "little") + raw + data)
  return str(path)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  import safetensors.numpy as st  # installed by the test command: missing = a broken install
  path = tmp_path_factory.mktemp("w") / "resnet18.safetensors"
  st.save_file(layout_state("resnet18"), str(path))
  return str(path)


@pytest.fixture(scope="module")
def resnet18_npz(resnet18_file, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("npz") / "resnet18.npz")
  convert_file(resnet18_file, "resnet18", out)
  return out


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_torchvision_layout_converts_to_exactly_the_flax_tree(arch):
  a = ARCHS[arch]
  model = create_model(a.jaxclf_model, num_classes=1000, **a.model_kwargs)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                           train=False))
  target = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  if a.family == "vgg":  # torchvision's classifier is dropped; jaxclf's head stays new
    target = {k: v for k, v in target.items() if "/Dense_0/" not in k}
  converted = {"/".join(k): v.shape for k, v in convert_torchvision(layout_state(arch), arch).items()}
  assert converted == target
  n_params = sum(int(np.prod(s)) for k, (s, _) in torchvision_layout(arch).items()
                 if not k.startswith("classifier") and k.rsplit(".", 1)[1] in ("weight", "bias"))
  # torchvision's documented parameter counts (VGG: the total less its 123,642,856-param classifier)
  assert n_params == {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "vgg11_bn": 132_868_840 - 123_642_856,
                      "vgg16_bn": 138_365_992 - 123_642_856}[arch]


def test_vgg_conv_bias_is_folded_into_the_batchnorm_mean():
  state = layout_state("vgg11_bn", seed=2)
  c = convert_torchvision(state, "vgg11_bn")
  np.testing.assert_allclose(c[("batch_stats", "BatchNorm_2", "mean")],
                             state["features.9.running_mean"] - state["features.8.bias"])
  np.testing.assert_array_equal(c[("params", "Conv_2", "kernel")],
                                state["features.8.weight"].transpose(2, 3, 1, 0))


def test_wrapped_and_half_precision_state_dicts_convert():
  state = {f"module.{k}": v for k, v in layout_state("resnet18", dtype=np.float16).items()}
  c = convert_torchvision(state, "resnet18")  # DataParallel's 'module.' prefix, float16 values
  assert c[("params", "Dense_0", "kernel")].dtype == np.float32
  assert c[("params", "Dense_0", "kernel")].shape == (512, 1000)


# ----------------------------------------------------------------------------- the .npz


def test_npz_loads_as_model_pretrained_with_a_new_head_and_a_grey_stem(resnet18_npz, resnet18_file):
  model = create_model("resnet18", num_classes=10, stem="imagenet")
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)),
                                           train=False))
  loaded = load_pretrained(resnet18_npz, model, tree, 10)
  assert loaded["params"]["Dense_0"]["kernel"] is tree["params"]["Dense_0"]["kernel"]  # kept new
  want = read_safetensors(resnet18_file)
  np.testing.assert_allclose(np.asarray(loaded["params"]["conv_init"]["kernel"])[:, :, 0],
                             want["conv1.weight"].sum(axis=1).transpose(1, 2, 0), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(loaded["batch_stats"]["ResNetBlock_4"]["norm_proj"]
                                           ["mean"]), want["layer3.0.downsample.1.running_mean"])
  with np.load(resnet18_npz, allow_pickle=False) as z:  # no pickles inside
    meta = json.loads(str(z[META_KEY]))
  assert meta["arch"] == "resnet18" and meta["model_kwargs"] == {"stem": "imagenet"}


def test_npz_into_the_small_stem_resnet_names_the_fix(resnet18_npz):
  model = create_model("resnet18", num_classes=10)  # stem='small': a 3x3 conv_init
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                           train=False))
  with pytest.raises(PretrainedError, match=r"resnet18\.npz does not fit the model.*"
                                            r"model\.kwargs\.stem=imagenet.*conv_init/kernel"):
    load_pretrained(resnet18_npz, model, tree, 10)


def test_sha256_pin_and_provenance(resnet18_file, tmp_path, capsys):
  from jaxclf.hashing import sha256_file
  digest = sha256_file(resnet18_file)
  out = str(tmp_path / "pinned.npz")
  rc, stdout, _ = run_cli(capsys, "weights", "convert", resnet18_file, "--arch", "resnet18",
                          "--out", out, "--sha256", digest.upper())
  assert rc == 0 and json.loads(stdout)["pinned"] is True
  rec = pretrained_provenance(out)
  assert rec["source_sha256"] == digest and rec["sha256_pinned"] is True
  assert rec["sha256"] == sha256_file(out) and rec["arch"] == "resnet18"
  rc, _, err = run_cli(capsys, "weights", "convert", resnet18_file, "--arch", "resnet18",
                       "--out", str(tmp_path / "x.npz"), "--sha256", "0" * 64)
  line = one_error_line(err)
  assert rc == 2 and resnet18_file in line and "does not match the pinned --sha256" in line
  assert not os.path.exists(tmp_path / "x.npz")
  rc, _, err = run_cli(capsys, "weights", "convert", resnet18_file, "--arch", "resnet18",
                       "--out", str(tmp_path / "y.npz"), "--sha256", "abc")
  assert rc == 2 and "expected 64 hex digits" in one_error_line(err)


# ----------------------------------------------------------------------------- bad input


def test_wrong_architecture_is_one_error_listing_every_mismatch(resnet18_file, tmp_path, capsys):
  rc, _, err = run_cli(capsys, "weights", "convert", resnet18_file, "--arch", "resnet50",
                       "--out", str(tmp_path / "r50.npz"))
  line = one_error_line(err)
  assert rc == 2 and f"{resnet18_file} is not a torchvision resnet50 state dict" in line
  assert "missing: layer1.0.conv3.weight" in line  # the bottleneck's third conv
  assert "shape mismatches: layer1.0.conv1.weight: file (64, 64, 3, 3) vs resnet50 (64, 64, 1, 1)" \
      in line
  assert "it fits --arch resnet18" in line and "165 missing" in line and "(16 more)" in line
  rc, _, err = run_cli(capsys, "weights", "convert", resnet18_file, "--arch", "vgg11_bn",
                       "--out", str(tmp_path / "v.npz"))
  line = one_error_line(err)
  assert "missing: features.0.weight" in line and "122 unexpected: " in line
  assert "it fits --arch resnet18" in line
  rc, _, err = run_cli(capsys, "weights", "convert", resnet18_file, "--arch", "resnet101",
                       "--out", str(tmp_path / "v.npz"))
  assert rc == 2 and "unknown --arch 'resnet101'; supported: resnet18" in one_error_line(err)


class _RunsShell:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path, marker):
  evil = pickle.dumps({"conv1.weight": _RunsShell(marker)}, protocol=2)
  legacy = tmp_path / "evil_legacy.pth"
  with open(legacy, "wb") as f:
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
      pickle.dump(obj, f, protocol=2)
    f.write(evil)
  zipped = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(zipped, "w") as z:
    z.writestr("archive/data.pkl", evil)
  return [str(legacy), str(zipped)]


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_malicious_pickles_are_refused_not_run(tmp_path, capsys, command):
  marker = tmp_path / "pwned"
  for path in _evil_files(tmp_path, marker):
    extra = ["--arch", "resnet18", "--out", str(tmp_path / "o.npz")] if command == "convert" else []
    rc, _, err = run_cli(capsys, "weights", command, path, *extra)
    line = one_error_line(err)
    assert rc == 2 and path in line
    assert "refusing to unpickle global" in line and "system" in line
  assert not marker.exists()


def _torch_files(tmp_path):
  # Imported here (torch is slow to import), not skipped: scripts/test.sh installs both.
  import safetensors.torch as st
  import torch
  state = {"conv.weight": torch.randn(64, 3, 7, 7), "bn.running_var": torch.rand(64),
           "bn.num_batches_tracked": torch.tensor(5), "half": torch.randn(8, 4).half(),
           "bf16": torch.randn(5).bfloat16()}
  zipped, legacy, safe = (str(tmp_path / n) for n in ("z.pth", "l.pth", "s.safetensors"))
  torch.save(state, zipped)
  torch.save(state, legacy, _use_new_zipfile_serialization=False)
  st.save_file(state, safe)
  return state, {"torch-zip": zipped, "torch-legacy": legacy, "safetensors": safe}


def test_inspect_lists_names_shapes_dtypes_in_every_format(tmp_path, capsys):
  state, files = _torch_files(tmp_path)
  want = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()}
  for fmt, path in files.items():
    rc, out, _ = run_cli(capsys, "weights", "inspect", path, "--json")
    info = json.loads(out)
    assert rc == 0 and info["format"] == fmt and info["count"] == 5
    assert {t["name"]: (t["shape"], t["dtype"]) for t in info["tensors"]} == want, fmt
  rc, out, _ = run_cli(capsys, "weights", "inspect", files["torch-zip"])
  assert rc == 0 and "5 tensors" in out and "conv.weight" in out and "(64, 3, 7, 7)" in out
  import torch  # a training checkpoint wrapping the state dict
  torch.save({"state_dict": state, "epoch": 3, "arch": "x"}, tmp_path / "ckpt.pth")
  rc, out, _ = run_cli(capsys, "weights", "inspect", str(tmp_path / "ckpt.pth"), "--json")
  assert {t["name"] for t in json.loads(out)["tensors"]} == {f"state_dict.{k}" for k in state}


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_truncated_files_name_the_file_in_every_format(tmp_path, capsys, command):
  _, files = _torch_files(tmp_path)
  for fmt, path in files.items():
    data = open(path, "rb").read()
    cut = f"{path}.cut" + (".safetensors" if fmt == "safetensors" else "")
    with open(cut, "wb") as f:
      f.write(data[:len(data) * 2 // 3])
    extra = ["--arch", "resnet18", "--out", str(tmp_path / "o.npz")] if command == "convert" else []
    rc, _, err = run_cli(capsys, "weights", command, cut, *extra)
    line = one_error_line(err)
    assert rc == 2 and cut in line, fmt
    assert any(w in line for w in ("truncated", "run past the data")), line


def test_lying_safetensors_headers_are_refused_before_reading(tmp_path, capsys):
  f32 = {"dtype": "F32", "shape": [2, 2]}
  cases = {
      "past_end": ({"w": {**f32, "data_offsets": [0, 1600]}}, bytes(16), None, "run past the data"),
      "short": ({"w": {**f32, "data_offsets": [0, 8]}}, bytes(16), None, "needs 16"),
      "overlap": ({"a": {**f32, "data_offsets": [0, 16]}, "b": {**f32, "data_offsets": [8, 24]}},
                  bytes(24), None, "overlap"),
      "header_len": ({"w": {**f32, "data_offsets": [0, 16]}}, bytes(16), 1 << 40,
                     "header length 1099511627776 exceeds the file"),
      "negative": ({"w": {**f32, "data_offsets": [16, 0]}}, bytes(16), None, "not [begin, end]"),
      "dtype": ({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), None,
                "unsupported dtype 'C64'"),
      "not_object": ([1, 2], b"", None, "not a JSON object"),
  }
  for name, (header, data, hlen, message) in cases.items():
    path = write_safetensors(tmp_path / f"{name}.safetensors", header, data, hlen)
    for command in ("inspect", "convert"):
      extra = ["--arch", "resnet18", "--out", str(tmp_path / "o.npz")] if command == "convert" else []
      rc, _, err = run_cli(capsys, "weights", command, path, *extra)
      line = one_error_line(err)
      assert rc == 2 and path in line and message in line, (name, line)
  bad_json = tmp_path / "json.safetensors"
  bad_json.write_bytes((5).to_bytes(8, "little") + b"{nope" + bytes(8))
  rc, _, err = run_cli(capsys, "weights", "inspect", str(bad_json))
  assert rc == 2 and "header is not valid JSON" in one_error_line(err)
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"hello, not weights at all")
  rc, _, err = run_cli(capsys, "weights", "inspect", str(junk))
  assert rc == 2 and f"{junk}: neither a torch checkpoint" in one_error_line(err)


@pytest.mark.slow
def test_imagenet_stem_resnet_exports_to_onnx_with_torchvision_padding():
  """The stem max pool is an explicit -inf pad + VALID pool: jax2onnx exported nn.max_pool's own
  explicit padding wrongly (max |Δlogit| 0.27 measured), which this guards against."""
  from jaxclf.export.onnx import convert_to_onnx, ort_session
  model = create_model("resnet18", num_classes=10, stem="imagenet", num_filters=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  fn = lambda x: model.apply(variables, x, train=False)  # noqa: E731
  session = ort_session(convert_to_onnx(fn, (64, 64, 3)).SerializeToString())
  x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  got = session.run(None, {session.get_inputs()[0].name: x})[0]
  np.testing.assert_allclose(got, np.asarray(fn(x)), atol=1e-5)
