"""The served model is the evaluated model: one trained run, its ONNX export, `jaxclf evaluate` on
both, and the in-process gateway agree on labels, accuracy and (calibrated) confidence.

  run dir  --load_inference (raw / T)-------------> jaxclf evaluate  \\
     |                                                                 same labels (>= 99.9%),
     +--export_run (logits / T in the graph)--> jaxclf evaluate       accuracy within 0.1 pt of
                                    |                                 each other and of run.json
                                    +--> gateway (softmax only) -->   same top-1, same confidence

Temperature T is applied exactly once on every path: the checkpoint loader divides, the ONNX
graph divides, the gateway only takes the softmax. The default suite uses a tiny run (TTA off,
so run.json's test accuracy is the single-view figure) and the first 512 test images written as
PNG files (the run's own test split); the slow twin does the same with a real default-config run
on all 10,000 Fashion-MNIST test images. Both check a model that learned first (the tiny one:
about 77% on those images, tests/test_train.py::test_the_tiny_config_learns; chance is 10%), and
a fitted temperature away from 1 (the tiny one: about 0.70), so that the agreement, and T applied
exactly once, are checked on a classifier and not on a constant.

The training loop fits T on the validation split (train.calibrate) and records it in
preprocessing.json and run.json "calibration"; for a run without that record this test fits T
itself with the same function (jaxclf.calibration.calibrate on the validation split's
raw logits of the best checkpoint) and writes it where the loop would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest

from conftest import ROOT
from jaxclf.calibration import T_MAX, T_MIN
from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
from jaxclf.data.transforms import PreprocessSpec, preprocess_batch
from jaxclf.evaluate import metrics as M

GATEWAY_IMAGES = 8


# ----------------------------------------------------------------------------- helpers

def ensure_temperature(run_dir: str, record: dict) -> float:
  """The run's temperature: the loop's own when it calibrated, else fitted here exactly as the
  loop does (validation split, best checkpoint, raw logits) and written to preprocessing.json."""
  from jaxclf.data.dataset import load_dataset
  from jaxclf.calibration import calibrate
  from jaxclf.train.checkpoints import load_inference
  spec_path = os.path.join(run_dir, "preprocessing.json")
  with open(spec_path) as f:
    spec = PreprocessSpec.from_json(f.read())
  fitted = record.get("calibration")
  if fitted:
    assert spec.temperature == pytest.approx(fitted["temperature"], rel=1e-9), (
        "run.json calibration and preprocessing.json disagree on the temperature")
    assert fitted["nll_after"] <= fitted["nll_before"] + 1e-9  # T minimises the val NLL
    return spec.temperature
  inf = load_inference(run_dir, "best")
  val = load_dataset(inf.config.data).split("val")
  x = preprocess_batch([val.source[i]["image"] for i in range(len(val.labels))], inf.spec)
  out = calibrate(inf.raw_logits(x), np.asarray(val.labels))
  with open(spec_path, "w") as f:
    f.write(dataclasses.replace(spec, temperature=out["temperature"]).to_json())
  return out["temperature"]


def write_png_folder(root: str, x: np.ndarray, y: np.ndarray) -> str:
  """Test images as class-per-folder PNGs (lossless: the pixels the run's test split holds)."""
  from PIL import Image
  for i, (img, label) in enumerate(zip(x, y)):
    d = os.path.join(root, CLASS_NAMES[label].replace("/", "_"))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(img[:, :, 0]).save(os.path.join(d, f"{i:05d}.png"))
  return root


def png_bytes(img: np.ndarray) -> bytes:
  import io

  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(buf, "PNG")
  return buf.getvalue()


def gateway_predictions(export_dir: str, images: list[np.ndarray]) -> list[dict]:
  """POST each image to the in-process gateway (FastAPI TestClient: the real app, ONNX backend)
  and return its predictions (all classes, best first)."""
  from fastapi.testclient import TestClient

  from serving.app import create_app
  from serving.settings import ServeSettings
  settings = ServeSettings(model_path=export_dir, warmup_runs=1, log_requests=False,
                           micro_batching=False, intra_op_threads=1)
  with TestClient(create_app(settings)) as client:
    deadline = time.monotonic() + 60
    while (r := client.get("/readyz")).status_code != 200:
      assert r.json().get("status") == "loading" and time.monotonic() < deadline, r.text
      time.sleep(0.05)
    out = []
    for img in images:
      r = client.post("/v1/predict?top_k=10", files={"file": ("x.png", png_bytes(img), "image/png")})
      assert r.status_code == 200, r.text
      out.append(r.json())
  return out


def check_served_agreement(run_dir: str, record: dict, test_data: str, test_x: np.ndarray,
                           tmp_path, *, min_agreement: float = 0.999, max_gap: float = 0.001,
                           min_accuracy: float = 0.6):
  from jaxclf.evaluate.evaluate import evaluate_model
  from jaxclf.evaluate.schema import read_metrics
  from jaxclf.export.onnx import export_run, ort_session
  from jaxclf.train.checkpoints import load_inference

  # --- first, a model that learned: agreement on labels, and equal accuracies, mean nothing for
  # a model that predicts one class (10% here, and every path agrees with every other on it).
  run_test = record["metrics"]["test"]
  assert run_test["accuracy"] >= min_accuracy, (
      f"the run's test accuracy {run_test['accuracy']:.2%} is not well above chance (10%): "
      "train a model that learned before checking that its served copy agrees with it")
  temperature = ensure_temperature(run_dir, record)
  # T must be fitted, and far enough from 1 that applying it zero times or twice shows below.
  assert T_MIN < temperature < T_MAX and abs(temperature - 1.0) > 0.02, (
      f"temperature {temperature}: at a bound or too close to 1 to check that it is applied once")
  export_dir = str(tmp_path / "export")
  result = export_run(run_dir, export_dir, parity_count=64, reference_count=512)
  meta = result.metadata

  # --- the export records T once, in the graph, and presents the single-view accuracy.
  assert meta["calibration"]["temperature"] == pytest.approx(temperature)
  assert meta["calibration"]["applied_in_graph"] is True
  with open(os.path.join(export_dir, "preprocessing.json")) as f:
    assert PreprocessSpec.from_json(f.read()).temperature == pytest.approx(temperature)
  assert meta["accuracy"]["test"] == run_test["accuracy"]
  assert meta["accuracy"]["test_tta"] == (record["metrics"].get("test_tta") or {}).get("accuracy")
  assert "Conv" in meta["model"]["op_types"]
  assert not [op for op in meta["model"]["op_types"] if ":" in op], meta["model"]["op_types"]

  # --- jaxclf evaluate on the export and on the run dir (the run's own JAX inference path).
  kw = dict(bootstrap_resamples=200, tensorboard=False)
  ev_onnx = evaluate_model(export_dir, test_data, str(tmp_path / "eval-onnx"), **kw)
  ev_ckpt = evaluate_model(run_dir, test_data, str(tmp_path / "eval-ckpt"), **kw)
  for ev in (ev_onnx, ev_ckpt):
    doc = read_metrics(ev.metrics_path)  # schema-valid on disk
    assert doc["test"]["num_examples"] == run_test["count"] == len(test_x)
    ts = doc["test"]["temperature_scaling"]
    assert ts["temperature"] == pytest.approx(temperature)
    assert ts["ece_after"] == doc["test"]["calibration"]["ece"]
    html = open(ev.report_path, encoding="utf-8").read()
    assert "ECE before calibration" in html and "Temperature scaling" in html
  np.testing.assert_array_equal(ev_onnx.labels, ev_ckpt.labels)
  np.testing.assert_array_equal(ev_onnx.example_index, ev_ckpt.example_index)
  pred_onnx, pred_ckpt = ev_onnx.logits.argmax(1), ev_ckpt.logits.argmax(1)
  # The labels agreed on are a classifier's: most classes predicted, most predictions right.
  assert len(np.unique(pred_ckpt)) >= 8, np.bincount(pred_ckpt, minlength=len(CLASS_NAMES))
  agreement = float((pred_onnx == pred_ckpt).mean())
  assert agreement >= min_agreement, f"ONNX and JAX agree on {agreement:.4%} of test images"
  np.testing.assert_allclose(ev_onnx.logits, ev_ckpt.logits, atol=1e-4)
  acc_onnx = ev_onnx.doc["test"]["accuracy"]
  acc_ckpt = ev_ckpt.doc["test"]["accuracy"]
  assert abs(acc_onnx - acc_ckpt) <= max_gap
  assert abs(acc_ckpt - run_test["accuracy"]) <= max_gap, (acc_ckpt, run_test)
  assert abs(acc_onnx - run_test["accuracy"]) <= max_gap, (acc_onnx, run_test)

  # --- calibration: both evaluations report the same before/after figures, and "before" really
  # is the network's raw output (recomputed here from the checkpoint without the loader's T).
  ts_onnx = ev_onnx.doc["test"]["temperature_scaling"]
  ts_ckpt = ev_ckpt.doc["test"]["temperature_scaling"]
  for k in ("ece_before", "ece_after", "nll_before", "nll_after"):
    assert ts_onnx[k] == pytest.approx(ts_ckpt[k], abs=1e-4), k
  inf = load_inference(run_dir, "best")
  assert inf.temperature == pytest.approx(temperature)
  raw = inf.raw_logits(preprocess_batch(list(test_x), inf.spec))
  y = np.asarray(ev_ckpt.labels)
  raw_rows = raw[row_positions(ev_ckpt)]
  np.testing.assert_allclose(ev_ckpt.logits, raw_rows / np.float32(temperature), atol=1e-4,
                             rtol=1e-5)
  assert ts_ckpt["ece_before"] == pytest.approx(M.top1_calibration(y, M.softmax(raw_rows))["ece"],
                                                abs=1e-6)
  fitted = record.get("calibration")
  if fitted:  # the loop calibrated: its own test figures, on the same images
    assert ts_ckpt["ece_before"] == pytest.approx(fitted["test_ece_before"], abs=1e-4)
    assert ts_ckpt["ece_after"] == pytest.approx(fitted["test_ece_after"], abs=1e-4)

  # --- the gateway serves softmax(ONNX logits): same top-1, same calibrated confidence.
  session = ort_session(os.path.join(export_dir, "model.onnx"))
  sample = test_x[:GATEWAY_IMAGES]
  onnx_logits = session.run(["logits"], {"images": preprocess_batch(list(sample), inf.spec)})[0]
  want = M.softmax(onnx_logits)
  np.testing.assert_allclose(want, M.softmax(raw[:GATEWAY_IMAGES] / temperature), atol=1e-5)
  # T once, not zero times or twice (|T - 1| > 0.02 was asserted above).
  gap = np.abs(want - M.softmax(raw[:GATEWAY_IMAGES])).max()
  gap2 = np.abs(want - M.softmax(raw[:GATEWAY_IMAGES] / temperature ** 2)).max()
  assert gap > 1e-3 and gap2 > 1e-3, (gap, gap2)
  for body, p in zip(gateway_predictions(export_dir, list(sample)), want):
    top = body["predictions"][0]
    assert top["index"] == int(p.argmax()) and top["label"] == CLASS_NAMES[top["index"]]
    got = np.zeros(len(CLASS_NAMES))
    for q in body["predictions"]:
      got[q["index"]] = q["confidence"]
    np.testing.assert_allclose(got, p, atol=2e-6)  # the API rounds to 6 decimals
  return {"temperature": temperature, "agreement": agreement, "accuracy_onnx": acc_onnx,
          "accuracy_checkpoint": acc_ckpt, "accuracy_run": run_test["accuracy"],
          "ece_before": ts_ckpt["ece_before"], "ece_after": ts_ckpt["ece_after"]}


def row_positions(ev) -> np.ndarray:
  """Each evaluated row's position in the Fashion-MNIST test set: the row index itself for
  'fashion_mnist', the file name (written by `write_png_folder`) for a folder of PNGs."""
  from jaxclf.evaluate.held_out import load_test_data
  if ev.doc["data"]["kind"] == "fashion_mnist":
    return np.asarray(ev.example_index)
  data = load_test_data(ev.doc["data"]["source"])
  return np.array([int(os.path.splitext(os.path.basename(data.describe(int(i))))[0])
                   for i in ev.example_index])




# ----------------------------------------------------------------------------- tests

def test_served_model_agrees_with_the_run(single_view_tiny_run, tmp_path):
  run_dir, record = single_view_tiny_run
  n = record["metrics"]["test"]["count"]
  x, y = load_arrays()["test"]
  x, y = x[:n], y[:n]  # a tiny run's test split is the first `limit_per_split` test images
  folder = write_png_folder(str(tmp_path / "test-images"), x, y)
  report = check_served_agreement(run_dir, record, folder, x, tmp_path)
  print(json.dumps(report))


@pytest.mark.slow
def test_served_default_model_agrees_on_the_full_test_set(tmp_path):
  """The same chain for a real default-config run (configs/cnn.py, ~10 min on 2 CPU cores) on all
  10,000 Fashion-MNIST test images. A run that enables flip TTA must keep run.json's
  metrics.test single-view and metrics.test_tta apart, and the registry must show them apart.
  JAXCLF_AGREEMENT_RUN=<run dir> checks an existing default-config run (e.g. one bench/race.py
  made) instead of training one."""
  from jaxclf.config import load_config
  from jaxclf.registry import Registry
  from jaxclf.train.loop import train_and_evaluate
  run_dir = os.environ.get("JAXCLF_AGREEMENT_RUN")
  if run_dir:
    with open(os.path.join(run_dir, "run.json")) as f:
      record = json.load(f)
  else:
    run_dir = str(tmp_path / "run")
    record = train_and_evaluate(load_config(f"{ROOT}/configs/cnn.py", environ={}), run_dir)
  x, _ = load_arrays()["test"]
  report = check_served_agreement(run_dir, record, "fashion_mnist", x, tmp_path)
  print(json.dumps(report))
  assert report["accuracy_run"] > 0.9
  # Calibration must help on the test split (the default config's label smoothing makes the raw
  # model under-confident).
  assert report["temperature"] < 1.0 and report["ece_after"] < report["ece_before"]
  reg = Registry(str(tmp_path / "registry"))
  mv = reg.register(str(tmp_path / "export"), "fashion")
  summary = mv.summary()
  assert summary["test_accuracy"] == record["metrics"]["test"]["accuracy"]
  if record["config"].get("train.tta_flip"):
    assert record["metrics"].get("test_tta"), "a TTA run must store metrics.test_tta apart"
    assert summary["test_tta_accuracy"] == record["metrics"]["test_tta"]["accuracy"]
