"""`jaxclf evaluate` end to end: real models (an ONNX graph run by onnxruntime; in the slow tests a
trained checkpoint and its jax2onnx export), real image files, the report rendered in headless
Chromium (Debian's `chromium`) through the DevTools protocol.

The fast tests use a nearest-centroid classifier written as a two-node ONNX graph (Reshape,
Gemm), fitted in a second on 2,000 Fashion-MNIST training images: a real model with real
mistakes (about 70% test accuracy), cheap enough for the default suite.

`JAXCLF_UPDATE_SCREENSHOT=1 pytest tests/test_report.py -k chromium` refreshes docs/report.png.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from jaxclf.data.types import DataError
from jaxclf.data.sources import fashion_mnist
from jaxclf.data.transforms import PreprocessSpec
from jaxclf.evaluate import report
from jaxclf.evaluate.evaluate import evaluate_model
from jaxclf.evaluate.model_loader import EvaluationError
from jaxclf.evaluate.schema import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = fashion_mnist.CLASS_NAMES
SPEC = PreprocessSpec(image_size=(28, 28), channels=1, mean=(0.2860,), std=(0.3530,),
                      class_names=tuple(NAMES))


# ----------------------------------------------------------------------------- fixtures

def write_centroid_export(export_dir: str, train_x: np.ndarray, train_y: np.ndarray,
                          spec: PreprocessSpec, graph_channels: int = 1) -> str:
  """A nearest-centroid classifier as ONNX: logits = (x . mu_c - |mu_c|^2 / 2) * scale."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  x = (train_x.astype(np.float32) / 255.0 - spec.mean[0]) / spec.std[0]
  x = x.reshape(len(x), -1)
  k = len(spec.class_names)
  mu = np.stack([x[train_y == c].mean(0) for c in range(k)])  # (K, D)
  scale = 0.02  # keeps the softmax away from 0/1 so calibration has something to show
  w = (mu.T * scale).astype(np.float32)  # (D, K)
  b = (-0.5 * (mu ** 2).sum(1) * scale).astype(np.float32)
  h, wd = spec.image_size
  if graph_channels != 1:  # a graph that disagrees with preprocessing.json (error tests)
    w = np.repeat(w, graph_channels, axis=0)
  graph = helper.make_graph(
      [helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
       helper.make_node("Gemm", ["flat", "W", "b"], ["logits"])],
      "centroids",
      [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", h, wd, graph_channels])],
      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
      [numpy_helper.from_array(np.array([-1, h * wd * graph_channels], np.int64), "flat_shape"),
       numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  os.makedirs(export_dir, exist_ok=True)
  onnx.save(model, os.path.join(export_dir, "model.onnx"))
  with open(os.path.join(export_dir, "preprocessing.json"), "w") as f:
    f.write(spec.to_json())
  with open(os.path.join(export_dir, "labels.txt"), "w") as f:
    f.write("\n".join(spec.class_names) + "\n")
  np.savez(os.path.join(export_dir, "centroids.npz"), w=w, b=b)
  # evaluate refuses a model.onnx with no recorded sha256 (jaxclf/integrity.py).
  from jaxclf.hashing import sha256_file
  with open(os.path.join(export_dir, "export.json"), "w") as f:
    json.dump({"artifacts": {"model.onnx": sha256_file(os.path.join(export_dir, "model.onnx"))}}, f)
  return export_dir


@pytest.fixture(scope="module")
def fmnist():
  return fashion_mnist.load_arrays()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, fmnist):
  x, y = fmnist["train"]
  return write_centroid_export(str(tmp_path_factory.mktemp("export") / "centroids"),
                               x[:2000], y[:2000], SPEC)


def _safe(name: str) -> str:
  return name.replace("/", "_")  # a folder cannot be called 'T-shirt/top'


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, fmnist):
  """8 PNGs per class from the Fashion-MNIST test set (upscaled to 56 px and saved as RGB, so
  the resize and channel mapping are exercised), one corrupt file and a hidden .DS_Store."""
  root = tmp_path_factory.mktemp("photos")
  x, y = fmnist["test"]
  for c, name in enumerate(NAMES):
    d = root / _safe(name)
    d.mkdir()
    for j, i in enumerate(np.flatnonzero(y == c)[:8]):
      Image.fromarray(x[i, :, :, 0]).resize((56, 56), Image.Resampling.BILINEAR).convert(
          "RGB").save(d / f"{j}.png")
  (root / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  return str(root)


@pytest.fixture(scope="module")
def fmnist_eval(tmp_path_factory, export_dir):
  out = str(tmp_path_factory.mktemp("eval") / "fmnist")
  return evaluate_model(os.path.join(export_dir, "model.onnx"), "fashion_mnist", out,
                        max_examples=3000, bootstrap_resamples=300)


# ----------------------------------------------------------------------------- evaluation

def test_onnx_on_fashion_mnist_writes_valid_metrics_and_plots(fmnist_eval, fmnist, export_dir):
  doc = read_metrics(fmnist_eval.metrics_path)  # validates against the published schema
  assert doc["split"] == "test" and doc["data"]["split"] == "test"
  assert doc["data"]["kind"] == "fashion_mnist" and doc["data"]["version"]
  assert doc["model"]["format"] == "onnx" and len(doc["model"]["sha256"]) == 64
  assert doc["val"] is None  # no run directory: no validation figures to report
  assert doc["model_selection"]["test_used_for_selection"] is False
  t = doc["test"]
  assert t["num_examples"] == 3000 and 0.6 < t["accuracy"] < 0.8
  ci = t["confidence_intervals"]["accuracy"]
  assert ci["low"] < t["accuracy"] < ci["high"] and ci["high"] - ci["low"] < 0.05

  # The same predictions computed here in numpy from the raw test images: evaluate used the
  # shared preprocessing (x/255 - mean) / std and scored the subset it says it scored.
  x, y = fmnist["test"]
  subset = np.sort(np.random.default_rng(0).permutation(len(y))[:3000])
  c = np.load(os.path.join(export_dir, "centroids.npz"))
  flat = ((x[subset].astype(np.float32) / 255.0 - 0.2860) / 0.3530).reshape(3000, -1)
  pred = (flat @ c["w"] + c["b"]).argmax(1)
  assert t["accuracy"] == pytest.approx(float(np.mean(pred == y[subset])), abs=1 / 3000)
  assert np.array_equal(np.array(t["confusion_matrix"]["counts"]).sum(1),
                        np.bincount(y[subset], minlength=10))

  wrong = t["most_confidently_wrong"]
  assert len(wrong) == 16 and wrong[0]["source"].startswith("fashion_mnist:test[")
  assert all(w["confidence"] >= v["confidence"] for w, v in zip(wrong, wrong[1:]))
  assert all(y[w["index"]] == w["true_index"] for w in wrong)  # indices point into the test set
  for key in ("confusion_matrix", "reliability", "per_class_f1", "error_gallery"):
    path = os.path.join(fmnist_eval.out_dir, doc["artifacts"][key])
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[0] > 300
  assert "curves" not in doc["artifacts"]  # no run: no curves, and the report says why


def test_plots_are_written_to_tensorboard(fmnist_eval):
  from tensorboard.backend.event_processing import event_accumulator as ea
  acc = ea.EventAccumulator(os.path.join(fmnist_eval.out_dir, "tb"),
                            size_guidance={ea.IMAGES: 0})
  acc.Reload()
  tags = acc.Tags()["images"]
  assert {"evaluate/confusion_matrix", "evaluate/reliability"} <= set(tags)
  img = acc.Images("evaluate/confusion_matrix")[0]
  with Image.open(io.BytesIO(img.encoded_image_string)) as im:
    assert im.size == (img.width, img.height) and img.width > 300


def _write_scalars(tb_dir, points, suffix):
  """Event file with (tag, step, value) points, written by tensorboard's own writer."""
  from tensorboard.compat.proto.event_pb2 import Event
  from tensorboard.compat.proto.summary_pb2 import Summary
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
  w = EventFileWriter(str(tb_dir), filename_suffix=suffix)
  for tag, step, value in points:
    w.add_event(Event(wall_time=time.time(), step=step,
                      summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))
  w.close()
  time.sleep(0.01)  # distinct wall times order the files


def test_curves_merge_writers_and_resumed_runs(tmp_path):
  from jaxclf.evaluate.curves import read_run_curves, val_metrics_at
  tb = tmp_path / "run" / "tb"
  _write_scalars(tb, [("train/loss", s, 1.0) for s in range(0, 101, 10)], ".a")
  # A second writer (validation) whose steps restart at 50: must not purge train points.
  _write_scalars(tb / "val", [("val/accuracy", 50, 0.7), ("val/accuracy", 100, 0.8),
                              ("val/loss", 100, 0.5)], ".b")
  # The run resumed from step 60: train points after 60 are replaced by the new ones.
  _write_scalars(tb, [("train/loss", s, 2.0) for s in range(60, 131, 10)], ".c")
  curves = read_run_curves(str(tmp_path / "run"))
  loss = curves["train/loss"]
  assert loss.steps.tolist() == list(range(0, 131, 10))
  assert loss.values.tolist() == [1.0] * 6 + [2.0] * 8
  assert val_metrics_at(curves, 75) == {"source": "tensorboard val/* at the evaluated step",
                                         "step": 50, "accuracy": pytest.approx(0.7), "loss": None}
  assert val_metrics_at(curves, 130)["loss"] == pytest.approx(0.5)
  assert read_run_curves(str(tmp_path / "no_run")) == {}


def test_report_html_is_self_contained_with_every_section(fmnist_eval):
  with open(fmnist_eval.report_path, encoding="utf-8") as f:
    page = f.read()
  for key, title in report.SECTIONS.items():
    assert f'<section id="{key}">' in page and title in page
  # Every src/href is inline data or an in-page anchor: the file opens offline, alone.
  refs = re.findall(r'(?:src|href)="([^"]*)"', page)
  assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
  assert "<script" not in page and "http://" not in page and "https://" not in page
  assert page.count('src="data:image/png;base64,') == 4  # cm, reliability, F1, gallery
  assert "never used for model selection" in page


def test_folder_of_images_skips_corrupt_files_and_matches_folder_names(photo_folder, export_dir,
                                                                       tmp_path):
  ev = evaluate_model(export_dir, photo_folder, str(tmp_path / "out"), bootstrap_resamples=100)
  doc = ev.doc
  assert doc["data"]["kind"] == "image_folder" and doc["data"]["split"] == "all"
  assert doc["test"]["num_examples"] == 80
  assert doc["data"]["renamed_classes"] == {"T-shirt_top": "T-shirt/top"}
  [skip] = doc["data"]["skipped"]
  assert skip["source"].endswith(os.path.join("Bag", "broken.png")) and skip["reason"]
  assert doc["test"]["accuracy"] > 0.5  # upscaled RGB photos still go through the same transform
  with open(ev.report_path, encoding="utf-8") as f:
    page = f.read()
  assert "broken.png" in page and "T-shirt_top" in page


def test_unknown_classes_are_listed(photo_folder, export_dir, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(photo_folder, root)
  for extra in ("Sweater", "Hat"):
    (root / extra).mkdir()
    shutil.copy(root / "Bag" / "0.png", root / extra / "0.png")
  with pytest.raises(DataError, match=r"classes unknown to the model: \['Hat', 'Sweater'\]"):
    evaluate_model(export_dir, str(root), str(tmp_path / "out"))


def test_empty_folder_is_a_clear_error(export_dir, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty folder"):
    evaluate_model(export_dir, str(tmp_path / "empty"), str(tmp_path / "out"))
  (tmp_path / "empty_classes" / "Bag").mkdir(parents=True)
  with pytest.raises(DataError, match="is empty"):
    evaluate_model(export_dir, str(tmp_path / "empty_classes"), str(tmp_path / "out"))


def test_loose_files_without_class_folders_are_a_clear_error(export_dir, tmp_path):
  (tmp_path / "flat").mkdir()
  Image.new("L", (28, 28)).save(tmp_path / "flat" / "a.png")
  with pytest.raises(DataError, match="no class folders"):
    evaluate_model(export_dir, str(tmp_path / "flat"), str(tmp_path / "out"))


def test_only_corrupt_images_is_a_clear_error(export_dir, tmp_path):
  (tmp_path / "bad" / "Bag").mkdir(parents=True)
  (tmp_path / "bad" / "Bag" / "x.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(DataError, match=r"none of the 1 images could be decoded .*x\.jpg"):
    evaluate_model(export_dir, str(tmp_path / "bad"), str(tmp_path / "out"))


def test_export_whose_spec_disagrees_with_its_graph(fmnist, tmp_path):
  x, y = fmnist["train"]
  three = PreprocessSpec(image_size=(28, 28), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                         class_names=tuple(NAMES))
  bad = write_centroid_export(str(tmp_path / "bad"), x[:500], y[:500], SPEC, graph_channels=1)
  with open(os.path.join(bad, "preprocessing.json"), "w") as f:
    f.write(three.to_json())
  with pytest.raises(EvaluationError, match=r"input 'images' is \['N', 28, 28, 1\].*"
                                            r"\(N, 28, 28, 3\).*inconsistent"):
    evaluate_model(bad, "fashion_mnist", str(tmp_path / "out"))


def test_unknown_registry_model_is_a_clear_error(tmp_path):
  uri = f"registry:nosuch@production?root={tmp_path / 'registry'}"
  with pytest.raises(EvaluationError, match=r"registry:nosuch@production.*no model named 'nosuch'"):
    evaluate_model(uri, "fashion_mnist", str(tmp_path / "out"))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxclf.cli", "evaluate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=180,
                        env={**os.environ, "JAXCLF_LOGLEVEL": "WARNING"})


def test_cli(export_dir, photo_folder, tmp_path):
  r = _cli("--model-path", os.path.join(export_dir, "model.onnx"), "--test-data", photo_folder,
           "--out", str(tmp_path / "cli"))
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["split"] == "test" and summary["examples"] == 80 and summary["skipped"] == 1
  assert os.path.isfile(summary["report"]) and os.path.isfile(summary["metrics"])
  r = _cli("--model-path", export_dir, "--test-data", str(tmp_path / "nowhere"))
  assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_cli_arguments(export_dir, capsys):
  from jaxclf import cli
  with pytest.raises(SystemExit) as e:
    cli.main(["evaluate", "--model-path", export_dir, "--test-data", "fashion_mnist",
              "--checkpoint", "newest"])
  assert e.value.code == 2
  assert "--checkpoint must be best, latest or a step number" in capsys.readouterr().err
  assert cli.main(["evaluate", "--model-path", export_dir + "/missing.onnx",
                   "--test-data", "fashion_mnist"]) == 2
  assert "missing.onnx does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- headless Chromium

class Chromium:
  """Debian's chromium, headless, driven over the DevTools protocol (websocket-client)."""

  def __init__(self):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "the report test needs Debian's chromium: apt-get install chromium"
    self.profile = tempfile.mkdtemp(prefix="jaxclf-chromium-")
    self.proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*",
         f"--user-data-dir={self.profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    self.port = None
    while time.time() < deadline:
      line = self.proc.stderr.readline()
      if not line and self.proc.poll() is not None:
        break
      m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
      if m:
        self.port = int(m.group(1))
        break
    if self.port is None:
      self.close()
      raise AssertionError("chromium did not start its DevTools endpoint within 60 s")
    # Drain stderr (dbus chatter) so the pipe never fills and blocks the browser.
    import threading
    threading.Thread(target=self.proc.stderr.read, daemon=True).start()

  def close(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    shutil.rmtree(self.profile, ignore_errors=True)

  def inspect(self, url: str, width: int = 1200, screenshot_scale: float = 1.0) -> dict:
    """Loads url; returns console errors, exceptions, failed or external requests, the
    sections and images as laid out, and a full-page screenshot (PNG bytes)."""
    import websocket
    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
      page = next(t for t in json.load(r) if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
    events, counter = [], [0]

    def call(method, **params):
      counter[0] += 1
      ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
      while True:
        msg = json.loads(ws.recv())
        if msg.get("id") == counter[0]:
          assert "error" not in msg, (method, msg["error"])
          return msg["result"]
        events.append(msg)

    def wait_for(method, timeout=60):
      deadline = time.time() + timeout
      while time.time() < deadline:
        if any(e.get("method") == method for e in events):
          return
        events.append(json.loads(ws.recv()))
      raise AssertionError(f"no {method} within {timeout} s")

    try:
      for domain in ("Runtime", "Log", "Network", "Page"):
        call(f"{domain}.enable")
      call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
           mobile=False)
      call("Page.navigate", url=url)
      wait_for("Page.loadEventFired")
      call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 300))",
           awaitPromise=True)  # late console messages, image decodes
      layout = call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
        sections: [...document.querySelectorAll('section')].map(s => ({id: s.id,
          title: (s.querySelector('h2') || {}).textContent, height: s.getBoundingClientRect().height})),
        images: [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
          width: i.getBoundingClientRect().width})),
        height: document.documentElement.scrollHeight})""")
      info = json.loads(layout["result"]["value"])
      shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                  clip={"x": 0, "y": 0, "width": width, "height": info["height"],
                        "scale": screenshot_scale})
    finally:
      ws.close()
    by = lambda m: [e["params"] for e in events if e.get("method") == m]  # noqa: E731
    console = [c for c in by("Runtime.consoleAPICalled") if c["type"] in ("error", "assert",
                                                                          "warning")]
    return {
        "console_errors": [" ".join(str(a.get("value", a.get("description"))) for a in c["args"])
                           for c in console],
        "exceptions": [e["exceptionDetails"].get("text") for e in by("Runtime.exceptionThrown")],
        "log_errors": [e["entry"]["text"] for e in by("Log.entryAdded")
                       if e["entry"]["level"] == "error"],
        "failed_requests": [e.get("errorText") for e in by("Network.loadingFailed")],
        "requests": [e["request"]["url"] for e in by("Network.requestWillBeSent")],
        "sections": info["sections"], "images": info["images"],
        "screenshot": base64.b64decode(shot["data"]),
    }


@pytest.fixture(scope="module")
def chromium():
  browser = Chromium()
  yield browser
  browser.close()


def test_report_in_headless_chromium(chromium, fmnist_eval, tmp_path):
  page = chromium.inspect("file://" + fmnist_eval.report_path)
  assert page["console_errors"] == [] and page["exceptions"] == []
  assert page["log_errors"] == [] and page["failed_requests"] == []
  external = [u for u in page["requests"] if not u.startswith(("file:", "data:"))]
  assert external == []
  assert [s["id"] for s in page["sections"]] == list(report.SECTIONS)
  assert all(s["height"] > 40 and s["title"] == report.SECTIONS[s["id"]] for s in page["sections"])
  assert len(page["images"]) == 4 and all(i["ok"] and i["width"] > 300 for i in page["images"])
  with Image.open(io.BytesIO(page["screenshot"])) as shot:
    assert shot.size[0] == 1200 and shot.size[1] > 3000
    # Not a blank page: the plots put many distinct colours on screen.
    assert len(shot.convert("RGB").getcolors(1 << 20)) > 1000
  path = tmp_path / "report.png"
  path.write_bytes(page["screenshot"])
  if os.environ.get("JAXCLF_UPDATE_SCREENSHOT") == "1":
    shutil.copy(path, os.path.join(REPO, "docs", "report.png"))


def test_chromium_check_catches_a_broken_page(chromium, tmp_path):
  """The checker is not blind: a script error, a console error and a missing image all show."""
  bad = tmp_path / "bad.html"
  bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                 '<section id="x"><h2>x</h2><img src="missing.png"></section>'
                 '<script>console.error("boom"); undefinedFunction();</script></body></html>')
  page = chromium.inspect(bad.as_uri())
  assert any("boom" in c for c in page["console_errors"])
  assert page["exceptions"]
  assert page["failed_requests"] and not page["images"][0]["ok"]


# ----------------------------------------------------------------------------- checkpoints (slow)

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A real, tiny training run (cnn_tiny, 512 images per split, 2 epochs)."""
  from jaxclf.config.defaults import default_config
  from jaxclf.train.loop import train_and_evaluate
  cfg = default_config()
  cfg.model.name = "cnn_tiny"
  cfg.data.limit_per_split = 512
  cfg.train.batch_size = 64
  cfg.train.num_epochs = 2
  cfg.periodic.log = "4 steps"
  cfg.train.progress_bar = False
  cfg.train.eval_batch_size = 256
  cfg.optimizer.learning_rate = 0.05
  run = str(tmp_path_factory.mktemp("run") / "tiny")
  train_and_evaluate(cfg, run)
  return run


@pytest.mark.slow
def test_checkpoint_eval_and_its_onnx_export_agree(trained_run, tmp_path):
  """The checkpoint, its ONNX export (jaxclf.export) and that export fetched from the registry
  give the same predictions on the same test images."""
  from jaxclf.export.onnx import export_run
  from jaxclf.registry import Registry

  ckpt = evaluate_model(trained_run, "fashion_mnist", str(tmp_path / "ckpt"), max_examples=1000,
                        bootstrap_resamples=100)
  doc = read_metrics(ckpt.metrics_path)
  assert doc["model"]["format"] == "checkpoint" and doc["model"]["checkpoint"] == "best"
  assert doc["val"]["step"] == doc["model"]["step"] and doc["val"]["accuracy"] is not None
  assert "validation split" in doc["model_selection"]["selected_by"]
  assert "curves" in doc["artifacts"]  # read from the run's TensorBoard events
  assert ckpt.out_dir.startswith(str(tmp_path))

  export = str(tmp_path / "export")
  export_run(trained_run, export, parity_count=16, reference_count=16)
  registry_root = str(tmp_path / "registry")
  Registry(registry_root).register(export, "tiny")
  for uri in (export, f"registry:tiny@experimental?root={registry_root}"):
    onnx_ev = evaluate_model(uri, "fashion_mnist", str(tmp_path / "onnx"), max_examples=1000,
                             bootstrap_resamples=100)
    m = onnx_ev.doc["model"]
    assert m["format"] == "onnx" and m["step"] == doc["model"]["step"] and m["uri"] == uri
    assert m["run_dir"] == os.path.abspath(trained_run)  # linked back through export.json
    assert onnx_ev.doc["val"] == doc["val"]
    a, b = ckpt.doc["test"], onnx_ev.doc["test"]
    assert a["confusion_matrix"]["counts"] == b["confusion_matrix"]["counts"]
    assert a["accuracy"] == b["accuracy"]
    assert [w["index"] for w in a["most_confidently_wrong"]] == \
        [w["index"] for w in b["most_confidently_wrong"]]
    assert a["log_loss"] == pytest.approx(b["log_loss"], abs=1e-4)


@pytest.mark.slow
def test_checkpoint_whose_spec_disagrees_with_its_weights(trained_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  spec = json.loads((run / "preprocessing.json").read_text())
  spec.update(channels=3, mean=[0.5] * 3, std=[0.5] * 3)
  (run / "preprocessing.json").write_text(json.dumps(spec))
  with pytest.raises(EvaluationError, match=r"does not fit.*28x28x3.*\(3, 3, 1, 8\)"):
    evaluate_model(str(run), "fashion_mnist", str(tmp_path / "out"))


@pytest.mark.slow
def test_checkpoint_choice(trained_run, tmp_path):
  latest = evaluate_model(trained_run, "fashion_mnist", str(tmp_path / "l"), which="latest",
                          max_examples=200, bootstrap_resamples=20)
  assert latest.doc["model"]["checkpoint"] == "latest"
  assert "none" in latest.doc["model_selection"]["selected_by"]
  step = latest.doc["model"]["step"]
  by_step = evaluate_model(trained_run, "fashion_mnist", str(tmp_path / "s"), which=step,
                           max_examples=200, bootstrap_resamples=20)
  assert by_step.doc["model"]["step"] == step
  with pytest.raises(EvaluationError, match="no checkpoint"):
    evaluate_model(trained_run, "fashion_mnist", str(tmp_path / "x"), which=999999)
