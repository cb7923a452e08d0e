"""ONNX export: the directory contract, names, metadata, dynamic batch, parity (and its failure),
and the jax2onnx ResNet workaround. Real Fashion-MNIST test images throughout."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxclf.data.transforms import PreprocessSpec, preprocess_batch


@pytest.fixture(scope="module")
def fmnist():
  from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
  arrays = load_arrays()
  return arrays, PreprocessSpec(class_names=tuple(CLASS_NAMES))


def _init(name, seed=0, **kw):
  import jax
  import jax.numpy as jnp

  from jaxclf.models import create_model
  model = create_model(name, num_classes=10, **kw)
  return model, model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)), train=False)


TEMPERATURE = 2.5  # a calibrated run's spec: the export bakes logits / T into the graph


@pytest.fixture(scope="module")
def cnn_export(fmnist, tmp_path_factory):
  import dataclasses

  from jaxclf.export.onnx import export_model
  (arrays, spec) = fmnist
  spec = dataclasses.replace(spec, temperature=TEMPERATURE)
  model, variables = _init("cnn_tiny")
  out = tmp_path_factory.mktemp("export") / "cnn"
  result = export_model(model, variables, spec, str(out), parity_images=list(arrays["test"][0][:64]),
                        reference_images=list(arrays["train"][0][:500]),
                        source={"run_dir": "runs/example", "checkpoint_step": 7},
                        model_name="cnn_tiny")
  return result, model, variables, spec, arrays


def test_export_directory_holds_the_contract_files(cnn_export):
  from jaxclf.export.onnx import sha256_file, verify_export
  result, _, _, spec, _ = cnn_export
  d = result.out_dir
  assert sorted(os.listdir(d)) == ["export.json", "labels.txt", "model.onnx", "model_raw.onnx",
                                   "preprocessing.json", "reference_stats.json"]
  assert PreprocessSpec.from_json(open(os.path.join(d, "preprocessing.json")).read()) == spec
  assert open(os.path.join(d, "labels.txt")).read().splitlines() == list(spec.class_names)
  meta = verify_export(d)
  assert meta["model"]["input_name"] == "images" and meta["model"]["output_name"] == "logits"
  assert meta["model"]["input_shape"] == [None, 28, 28, 1] and meta["model"]["opset"] == 23
  assert meta["source"] == {"run_dir": "runs/example", "checkpoint_step": 7}
  for f, sha in meta["artifacts"].items():
    assert sha == sha256_file(os.path.join(d, f))
  stats = json.load(open(os.path.join(d, "reference_stats.json")))
  assert stats["version"] == 1 and stats["count"] == 500
  assert stats["output"]["class_distribution"]["labels"] == list(spec.class_names)
  assert sum(stats["input"]["brightness"]["fractions"]) == pytest.approx(1.0)


def test_onnx_names_dynamic_batch_and_metadata(cnn_export):
  import onnx

  from jaxclf.export.onnx import ort_session, read_metadata
  result, model, variables, spec, arrays = cnn_export
  path = os.path.join(result.out_dir, "model.onnx")
  proto = onnx.load(path)
  (inp,), (out,) = proto.graph.input, proto.graph.output
  assert (inp.name, out.name) == ("images", "logits")
  dims = inp.type.tensor_type.shape.dim
  assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [28, 28, 1]
  meta = read_metadata(path)
  assert PreprocessSpec.from_json(meta["jaxclf.preprocessing"]) == spec
  assert json.loads(meta["jaxclf.labels"]) == list(spec.class_names)
  session = ort_session(path)
  x = preprocess_batch(list(arrays["test"][0][:65]), spec)
  ref = np.asarray(model.apply(variables, x, train=False)) / spec.temperature
  for n in (3, 65):  # batch sizes the parity check did not use
    got = session.run(["logits"], {"images": x[:n]})[0]
    assert got.shape == (n, 10) and np.abs(got - ref[:n]).max() < 1e-4


def test_temperature_is_applied_once_inside_a_standard_graph(cnn_export, tmp_path):
  """The graph outputs logits / T (parity-checked against JAX / T), export.json and both copies of
  the spec record T, the graph keeps standard ONNX ops (Conv, no custom domains: Triton's ORT and
  onnxruntime run it as is), and `jaxclf evaluate` reports ECE before (raw) and after (served)."""
  import onnx

  from jaxclf.evaluate import metrics as M
  from jaxclf.evaluate.evaluate import evaluate_model
  from jaxclf.export.onnx import graph_op_types, ort_session, read_metadata
  result, model, variables, spec, arrays = cnn_export
  path = os.path.join(result.out_dir, "model.onnx")
  meta = json.load(open(os.path.join(result.out_dir, "export.json")))
  assert meta["calibration"]["temperature"] == TEMPERATURE and meta["calibration"]["applied_in_graph"]
  assert json.loads(open(os.path.join(result.out_dir, "preprocessing.json")).read())["temperature"] == TEMPERATURE
  assert float(read_metadata(path)["jaxclf.temperature"]) == TEMPERATURE
  proto = onnx.load(path)
  ops = graph_op_types(proto)
  assert meta["model"]["op_types"] == ops
  assert "Conv" in ops and "Div" in ops, ops
  assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node) and not proto.functions
  assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
  x = preprocess_batch(list(arrays["test"][0][:32]), spec)
  raw = np.asarray(model.apply(variables, x, train=False))
  got = ort_session(path).run(["logits"], {"images": x})[0]
  np.testing.assert_allclose(got, raw / TEMPERATURE, atol=1e-5)
  assert not np.allclose(M.softmax(got), M.softmax(raw), atol=1e-3)  # T really was applied
  # evaluate: every figure is of the calibrated (served) model; "before" undoes T.
  ev = evaluate_model(result.out_dir, "fashion_mnist", str(tmp_path / "eval"), max_examples=300,
                      bootstrap_resamples=50, tensorboard=False)
  ts = ev.doc["test"]["temperature_scaling"]
  assert ts["temperature"] == TEMPERATURE and ts["calibrated"] and "ONNX" in ts["applied_by"]
  assert ts["ece_after"] == ev.doc["test"]["calibration"]["ece"]
  y = ev.labels
  xs = preprocess_batch([arrays["test"][0][i] for i in ev.example_index], spec)
  raw_eval = np.asarray(model.apply(variables, xs, train=False))
  assert ts["ece_before"] == pytest.approx(M.top1_calibration(y, M.softmax(raw_eval))["ece"], abs=1e-5)
  assert ts["ece_after"] == pytest.approx(
      M.top1_calibration(y, M.softmax(raw_eval / TEMPERATURE))["ece"], abs=1e-5)
  assert "ECE before calibration" in open(ev.report_path).read()


def test_raw_pixel_graph_is_the_model_behind_a_normalisation_node(cnn_export, tmp_path):
  """model_raw.onnx (what Triton's NAME / NAME_onnx load): input `pixels` raw 0-255, first nodes
  Sub mean / Mul scale with transforms' own constants, then model.onnx's nodes unchanged. On real
  test images at batch sizes the export did not use, raw graph(pixels) equals model.onnx(
  normalize(pixels)) within float32 rounding and JAX / T within the export tolerance. Both files
  are hashed in export.json and a changed byte in either is refused on load."""
  import shutil

  import onnx
  from onnx import numpy_helper

  from jaxclf.data.transforms import normalization_constants, normalize
  from jaxclf.export.onnx import (RAW_PARITY_TOLERANCE, ExportError, ort_session, raw_pixels,
                                  read_metadata, sha256_file, verify_export)
  from jaxclf.integrity import IntegrityError, read_verified
  result, model, variables, spec, arrays = cnn_export
  d = result.out_dir
  raw_path, norm_path = os.path.join(d, "model_raw.onnx"), os.path.join(d, "model.onnx")
  raw, norm = onnx.load(raw_path), onnx.load(norm_path)
  (inp,), (out,) = raw.graph.input, raw.graph.output
  assert (inp.name, out.name) == ("pixels", "logits")
  assert [x.dim_value for x in inp.type.tensor_type.shape.dim[1:]] == [28, 28, 1]
  sub, mul = raw.graph.node[:2]
  assert (sub.op_type, mul.op_type) == ("Sub", "Mul") and mul.output[0] == "images"
  consts = {t.name: numpy_helper.to_array(t) for t in raw.graph.initializer}
  mean, scale = normalization_constants(spec)
  np.testing.assert_array_equal(consts[sub.input[1]], mean)
  np.testing.assert_array_equal(consts[mul.input[1]], scale)
  assert [n.op_type for n in raw.graph.node[2:]] == [n.op_type for n in norm.graph.node]
  assert read_metadata(raw_path)["jaxclf.input_name"] == "pixels"
  meta = verify_export(d)
  assert meta["artifacts"]["model_raw.onnx"] == sha256_file(raw_path)
  assert meta["model"]["raw_input"]["input_name"] == "pixels"
  assert meta["model"]["raw_input"]["range"] == [0, 255]
  recorded = meta["parity"]["raw_input"]
  assert recorded["passed"] and recorded["batch_sizes"] == [1, 7, 64]
  assert recorded["top1_agreement"] == 1.0 and recorded["max_abs_diff"] <= recorded["tolerance"]

  images = list(arrays["test"][0][1000:1065])
  pixels = raw_pixels(images, spec)
  assert pixels.dtype == np.float32 and pixels.max() > 200  # really raw 0-255
  jax_ref = np.asarray(model.apply(variables, preprocess_batch(images, spec), train=False)) / spec.temperature
  for n in (3, 65):
    want = ort_session(norm_path).run(["logits"], {"images": normalize(pixels[:n], spec)})[0]
    got = ort_session(raw_path).run(["logits"], {"pixels": pixels[:n]})[0]
    assert np.abs(got - want).max() <= RAW_PARITY_TOLERANCE * max(1.0, np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - jax_ref[:n]).max() < 1e-4

  tampered = tmp_path / "tampered"
  shutil.copytree(d, tampered)
  data = bytearray((tampered / "model_raw.onnx").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (tampered / "model_raw.onnx").write_bytes(bytes(data))
  with pytest.raises(ExportError, match="model_raw.onnx"):
    verify_export(str(tampered))
  with pytest.raises(IntegrityError, match=r"model_raw.onnx: sha256 .* does not match"):
    read_verified(str(tampered / "model_raw.onnx"))
  assert read_verified(raw_path)[1] == meta["artifacts"]["model_raw.onnx"]


def test_input_normalization_is_per_channel_on_the_last_axis():
  """An RGB spec: the Sub/Mul constants broadcast over NHWC's channel axis exactly as
  transforms.normalize does (checked on a one-node graph, so no model is needed)."""
  import onnx
  from onnx import TensorProto, helper

  from jaxclf.data.transforms import normalize
  from jaxclf.export.onnx import ort_session, with_input_normalization
  spec = PreprocessSpec(image_size=(5, 4), channels=3, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225), class_names=("a", "b"))
  graph = helper.make_graph(
      [helper.make_node("Identity", ["images"], ["logits"])], "identity",
      [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 5, 4, 3])],
      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5, 4, 3])])
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  raw = with_input_normalization(proto, spec)
  onnx.checker.check_model(raw)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3)).astype(np.float32)
  got = ort_session(raw.SerializeToString()).run(["logits"], {"pixels": pixels})[0]
  np.testing.assert_allclose(got, normalize(pixels, spec), rtol=0, atol=1e-6)
  grey = ort_session(raw.SerializeToString()).run(
      ["logits"], {"pixels": np.full((1, 5, 4, 3), 128, np.float32)})[0]
  assert len({round(float(grey[0, 0, 0, c]), 4) for c in range(3)}) == 3  # one constant per channel


def test_parity_numbers_are_recorded_for_batches_1_7_64(cnn_export):
  result = cnn_export[0]
  parity = json.load(open(os.path.join(result.out_dir, "export.json")))["parity"]
  assert parity["batch_sizes"] == [1, 7, 64] and parity["passed"]
  for b in ("1", "7", "64"):
    assert parity["per_batch"][b]["count"] == int(b)
    assert parity["per_batch"][b]["max_abs_diff"] <= 1e-4
    assert parity["per_batch"][b]["top1_agreement"] == 1.0


def test_parity_failure_refuses_the_export(cnn_export, tmp_path):
  from jaxclf.export.onnx import ParityError, check_parity, export_model, ort_session
  result, model, _, spec, arrays = cnn_export
  # The ONNX file of one set of weights against JAX running another: a real disagreement.
  _, other = _init("cnn_tiny", seed=1)
  session = ort_session(os.path.join(result.out_dir, "model.onnx"))
  x = preprocess_batch(list(arrays["test"][0][:64]), spec)
  with pytest.raises(ParityError, match="parity failed"):
    check_parity(lambda b: np.asarray(model.apply(other, b, train=False)), session, x)
  # A tolerance below float32 round-off: the export is refused and leaves nothing behind.
  _, variables = _init("cnn_tiny")
  out = tmp_path / "strict"
  with pytest.raises(ParityError):
    export_model(model, variables, spec, str(out), parity_images=list(arrays["test"][0][:8]),
                 tolerance=1e-12)
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]


def test_export_refuses_bad_inputs(cnn_export, tmp_path):
  from jaxclf.export.onnx import ExportError, export_model, verify_export
  result, model, variables, spec, arrays = cnn_export
  with pytest.raises(ExportError, match="already exists"):
    export_model(model, variables, spec, result.out_dir, parity_images=list(arrays["test"][0][:4]))
  with pytest.raises(ExportError, match="class_names"):
    export_model(model, variables, PreprocessSpec(), str(tmp_path / "x"),
                 parity_images=list(arrays["test"][0][:4]))
  with pytest.raises(ExportError, match="missing"):
    verify_export(str(tmp_path))


# A canary for a jax2onnx upstream bug (15 s of export); the slow suite keeps watching it.
@pytest.mark.slow
def test_jax2onnx_transpose_pass_workaround_is_still_needed(fmnist, monkeypatch):
  """Fails loudly when jax2onnx changes: if the pass is renamed the workaround is stale; if the
  graph without it loads in onnxruntime, the bug is fixed and the workaround can go.
  The bug shows in residual graphs with flax's nn.BatchNorm (a BatchNormalization node between
  transposes): EfficientNet and users' own models have it; jaxclf's ResNet now uses
  layers.BatchNorm (plain arithmetic in ONNX), so the test puts nn.BatchNorm back into it."""
  import flax.linen as nn
  import onnxruntime

  import jaxclf.models.resnet
  # (`impl` picks layers.BatchNorm's CPU kernels; nn.BatchNorm has no such field)
  monkeypatch.setattr(jaxclf.models.resnet, "BatchNorm",
                      lambda *args, impl=None, **kwargs: nn.BatchNorm(*args, **kwargs))
  from jax2onnx.converter import ir_optimizations as iro

  from jaxclf.export.onnx import (BROKEN_JAX2ONNX_PASSES, check_parity, convert_to_onnx,
                                  ort_session)
  names = [p.name for p in iro._OPTIMIZER_PASSES]
  assert set(BROKEN_JAX2ONNX_PASSES) <= set(names), (
      f"jax2onnx's optimizer passes changed ({names}); re-check the ResNet export without the "
      "workaround in jaxclf/export/onnx.py")
  arrays, spec = fmnist
  # The smallest ResNet that shows the bug: two stages of two residual blocks.
  model, variables = _init("resnet_tiny", stage_sizes=(2, 2), num_filters=4)
  fn = lambda x: model.apply(variables, x, train=False)
  broken = convert_to_onnx(fn, spec.input_shape, workarounds=False)
  with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.Fail, match="Incompatible dimensions"):
    ort_session(broken.SerializeToString())
  assert [p.name for p in iro._OPTIMIZER_PASSES] == names  # the patch was undone
  fixed = convert_to_onnx(fn, spec.input_shape)
  x = preprocess_batch(list(arrays["test"][0][:64]), spec)
  report = check_parity(lambda b: np.asarray(fn(b)), ort_session(fixed.SerializeToString()), x)
  assert report["passed"]


def _train_briefly(model, variables, arrays, spec, steps, seed=0):
  """A few hundred SGD steps so that the parity check sees confident, realistic logits."""
  import jax
  import jax.numpy as jnp
  import optax
  x_all, y_all = arrays["train"]
  tx = optax.sgd(0.05, momentum=0.9)
  params, stats = variables["params"], variables.get("batch_stats", {})
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (_, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), upd["batch_stats"], opt

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(y_all), 128)
    params, stats, opt = step(params, stats, opt,
                              jnp.asarray(preprocess_batch(list(x_all[idx]), spec)), y_all[idx])
  return {"params": params, "batch_stats": stats}


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,steps", [("cnn", {}, 300),
                                           ("resnet18", {"num_filters": 16}, 100)])
def test_full_test_set_parity(fmnist, tmp_path, name, kw, steps):
  """The must-show: ONNX vs JAX on all 10,000 Fashion-MNIST test images, max |Δlogit| <= 1e-4 and
  100% top-1 agreement, for the CNN and a ResNet (briefly trained, so logits are realistic)."""
  import jax

  from jaxclf.export.onnx import export_model, full_parity, ort_session
  arrays, spec = fmnist
  model, variables = _init(name, **kw)
  variables = _train_briefly(model, variables, arrays, spec, steps)
  result = export_model(model, variables, spec, str(tmp_path / name),
                        parity_images=list(arrays["test"][0][:64]), model_name=name)
  x = preprocess_batch(list(arrays["test"][0]), spec)
  apply = jax.jit(lambda v, b: model.apply(v, b, train=False))
  report = full_parity(lambda b: np.asarray(apply(variables, b)),
                       ort_session(os.path.join(result.out_dir, "model.onnx")), x)
  accuracy = float((np.concatenate([np.asarray(apply(variables, x[i:i + 500]))
                                    for i in range(0, len(x), 500)]).argmax(1)
                    == arrays["test"][1]).mean())
  print(json.dumps({"model": name, "train_steps": steps, "test_accuracy": accuracy, **report}))
  assert report["count"] == 10_000
  assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0


@pytest.mark.slow
def test_export_cli_from_a_training_run(tmp_path, capsys):
  """`jaxclf export --run RUN --out DIR --register NAME` on a real (tiny) training run: the
  export records where it came from, and the registry version carries it."""
  from jaxclf.cli import run_training
  from jaxclf.deploy.cli import main
  from jaxclf.registry import Registry
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = tmp_path / "run"
  assert run_training(os.path.join(root, "configs", "cnn.py") + ":tiny", str(run)) == 0
  capsys.readouterr()
  out = tmp_path / "export"
  rc = main(["export", "--run", str(run), "--out", str(out), "--register", "fashion",
             "--root", str(tmp_path / "registry")])
  printed = json.loads(capsys.readouterr().out)
  assert rc == 0 and printed["parity"]["passed"] and printed["registered"]["version"] == 1
  meta = json.load(open(out / "export.json"))
  run_json = json.load(open(run / "run.json"))
  assert meta["source"]["run_dir"] == str(run)
  assert meta["source"]["checkpoint_step"] > 0
  assert meta["source"]["dataset_version"] == run_json["dataset"]["version"]
  assert meta["source"]["metrics"] == run_json["metrics"]
  stats = json.load(open(out / "reference_stats.json"))
  assert stats["count"] > 0 and "val split" in stats["source"]
  shown = Registry(str(tmp_path / "registry")).show("fashion", 1)
  assert shown["metrics"]["test"] == run_json["metrics"]["test"]
  assert shown["dataset_version"] == run_json["dataset"]["version"]


def test_depthwise_convs_export_as_grouped_convs_while_training_uses_cpu_kernels():
  """Lite0's depthwise convs train on CPU kernels (oneDNN's depthwise primitive, or k*k taps:
  efficientnet.resolve_depthwise_impl), but the ONNX graph keeps one grouped Conv per layer,
  which onnxruntime runs natively; the graph still gives the JAX logits."""
  import jax
  import jax.numpy as jnp
  import onnxruntime as ort

  from jaxclf.export.onnx import convert_to_onnx
  from jaxclf.models import efficientnet
  from jaxclf.models.registry import create_model
  model = create_model("efficientnet_tiny", 10)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.asarray(x), train=False)
  forward = lambda inp: model.apply(variables, inp, train=False)
  assert efficientnet.resolve_depthwise_impl("auto") != "xla"  # CPU kernels here
  proto = convert_to_onnx(forward, (32, 32, 1))
  grouped = [n for n in proto.graph.node if n.op_type == "Conv"
             and any(a.name == "group" and a.i > 1 for a in n.attribute)]
  assert grouped, "the depthwise convs were exported as taps"
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  got = session.run(None, {session.get_inputs()[0].name: x})[0]
  np.testing.assert_allclose(got, np.asarray(forward(jnp.asarray(x))), rtol=1e-4, atol=1e-4)
