"""A real tritonserver (2.51, from the serving venv) on free local ports, fed by the registry.

Needs .venv-serve: `scripts/setup_serving_env.sh` builds it (CI runs it before the tests). The
clients run in that venv as subprocesses (tritonclient pins numpy < 2); the reference numbers come
from onnxruntime in this process on the same image files.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from jaxclf.data.decode import decode_image
from jaxclf.data.transforms import PreprocessSpec, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serving_env():
  from jaxclf.export.serving_env import ServingEnv, ServingEnvError
  try:
    return ServingEnv.find()
  except ServingEnvError as e:
    pytest.fail(f"{e}\nThese tests need the serving venv: run `bash scripts/setup_serving_env.sh`",
                pytrace=False)


def _make_export(out, seed):
  import jax
  import jax.numpy as jnp

  from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
  from jaxclf.export.onnx import export_model
  from jaxclf.models import create_model
  x, _ = load_arrays()["test"]
  model = create_model("cnn_tiny", num_classes=10)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)), train=False)
  spec = PreprocessSpec(class_names=tuple(CLASS_NAMES))
  return export_model(model, variables, spec, str(out), parity_images=list(x[:64]),
                      model_name="cnn_tiny", source={"run_dir": f"seed{seed}"}).out_dir


def _write_images(d):
  """Real files as users send them: PNGs of test images, an RGB JPEG of another size, junk."""
  from PIL import Image

  from jaxclf.data.sources.fashion_mnist import load_arrays
  x, _ = load_arrays()["test"]
  os.makedirs(d, exist_ok=True)
  paths = []
  for i in range(4):
    p = os.path.join(d, f"test{i}.png")
    Image.fromarray(x[100 + i, :, :, 0]).save(p)
    paths.append(p)
  p = os.path.join(d, "colour.jpg")
  Image.fromarray(x[200, :, :, 0]).convert("RGB").resize((90, 60)).save(p, quality=90)
  paths.append(p)
  bad = os.path.join(d, "not_an_image.png")
  with open(bad, "wb") as f:
    f.write(b"GIF89a? no, just some bytes pretending to be a picture")
  return paths, bad


def _reference_probs(export_dir, paths):
  from jaxclf.export.onnx import load_spec, ort_session, softmax
  spec = load_spec(export_dir)
  x = np.stack([preprocess(decode_image(open(p, "rb").read(), spec.channels), spec) for p in paths])
  session = ort_session(os.path.join(export_dir, "model.onnx"))
  return softmax(session.run(["logits"], {"images": x})[0])


def _client(env, url, protocol, files, *extra):
  r = subprocess.run([env.python, "-m", "serving.triton_client", "--url", url, "--protocol",
                      protocol, *extra, *files], capture_output=True, text=True, cwd=REPO,
                     timeout=120)
  assert r.returncode in (0, 1), r.stderr
  return r.returncode, json.loads(r.stdout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  env = _serving_env()
  from jaxclf.export.triton_server import TritonServer
  from jaxclf.registry import Registry
  from jaxclf.deploy.sync import sync_serving
  tmp = tmp_path_factory.mktemp("triton")
  exports = [_make_export(tmp / f"export{s}", seed=s) for s in (0, 1)]
  registry = Registry(str(tmp / "registry"))
  for e in exports:
    registry.register(e, "fashion")
  registry.promote("fashion", 1, "production", reason="first model")
  repo = str(tmp / "model_repository")
  sync_serving(registry, "fashion", repo)
  paths, bad = _write_images(str(tmp / "images"))
  server = TritonServer(repo, env=env).start()
  try:
    yield {"env": env, "server": server, "registry": registry, "repo": repo,
           "exports": exports, "paths": paths, "bad": bad, "tmp": tmp}
  finally:
    server.stop()


def test_server_health_config_and_metrics(served):
  s = served["server"]
  assert urllib.request.urlopen(f"http://{s.http_url}/v2/health/ready").status == 200
  cfg = json.load(urllib.request.urlopen(f"http://{s.http_url}/v2/models/fashion_image/config"))
  assert cfg["platform"] == "ensemble" and cfg["max_batch_size"] == 64
  assert [st["model_name"] for st in cfg["ensemble_scheduling"]["step"]] == [
      "fashion_preprocess", "fashion", "fashion_postprocess"]
  cls = json.load(urllib.request.urlopen(f"http://{s.http_url}/v2/models/fashion/config"))
  assert cls["backend"] == "python" and "dynamic_batching" in cls
  # Triton's standard image interface: one NHWC FP32 input, one FP32 output with labels.
  (inp,), (out,) = cls["input"], cls["output"]
  assert (inp["name"], inp["dims"], inp["format"], inp["data_type"]) == (
      "pixels", [28, 28, 1], "FORMAT_NHWC", "TYPE_FP32")
  assert (out["name"], out["dims"], out["label_filename"]) == ("logits", [10], "labels.txt")
  # NAME_onnx is in the repository for GPU servers but cannot load here (no onnxruntime backend).
  index = {e["name"]: e for e in json.loads(urllib.request.urlopen(urllib.request.Request(
      f"http://{s.http_url}/v2/repository/index", data=b"{}", method="POST")).read())}
  assert index["fashion_image"]["state"] == "READY"
  assert "fashion_onnx" in index and index["fashion_onnx"].get("state") != "READY"
  _client(served["env"], s.http_url, "http", served["paths"][:1])
  metrics = urllib.request.urlopen(s.metrics_url).read().decode()
  assert 'nv_inference_request_success{model="fashion_image",version="1"}' in metrics


def test_repository_configs_parse_against_triton_schema(served):
  from jaxclf.export.triton_config import read_config, validate_repository
  configs = validate_repository(served["repo"])
  assert set(configs) == {"fashion", "fashion_onnx", "fashion_preprocess", "fashion_postprocess",
                          "fashion_image"}
  gpu = read_config(os.path.join(served["repo"], "fashion_onnx"))
  assert gpu.platform == "onnxruntime_onnx"
  assert list(gpu.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
  assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
  trt = gpu.optimization.execution_accelerators.gpu_execution_accelerator[0]
  assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
  assert trt.parameters["trt_engine_cache_enable"] == "true"
  assert gpu.model_warmup[0].batch_size > 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_matches_onnxruntime(served, protocol):
  s = served["server"]
  url = s.http_url if protocol == "http" else s.grpc_url
  rc, out = _client(served["env"], url, protocol, served["paths"], "--probabilities")
  assert rc == 0, out
  want = _reference_probs(served["exports"][0], served["paths"])
  labels = PreprocessSpec.from_json(open(os.path.join(served["exports"][0],
                                                       "preprocessing.json")).read()).class_names
  for row, ref in zip(out["results"], want):
    assert row["model_version"] == "1"
    got = np.array(row["probabilities"])
    assert np.abs(got - ref).max() < 1e-5
    assert [t["label"] for t in row["top"]] == [labels[i] for i in np.argsort(-ref, kind="stable")[:5]]
    assert row["top"][0]["score"] == pytest.approx(ref.max(), abs=1e-5)


def test_batched_request_and_classification_extension(served):
  s = served["server"]
  rc, out = _client(served["env"], s.http_url, "http", served["paths"], "--batch",
                    "--classification", "3")
  assert rc == 0, out
  ref = _reference_probs(served["exports"][0], served["paths"])
  for row, p in zip(out["results"], ref):
    score, index, label = row["classification"][0].split(":", 2)
    assert int(index) == int(p.argmax()) and float(score) == pytest.approx(p.max(), abs=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_non_image_bytes_get_an_error_and_the_server_keeps_serving(served, protocol):
  s = served["server"]
  url = s.http_url if protocol == "http" else s.grpc_url
  rc, out = _client(served["env"], url, protocol, [served["bad"], served["paths"][0]])
  assert rc == 1
  bad, good = out["results"]
  assert "not a recognised image" in bad["error"] and "model_version" not in bad
  assert good["model_version"] == "1" and good["top"]
  assert s.proc.poll() is None and s.ready()


LOOP = r"""
import json, sys, time
from serving.triton_client import classify, make_client
url, protocol, path, stop, log = sys.argv[1:6]
client = make_client(url, protocol)
sink = open(log, "w")  # a file, not a pipe: a full pipe would stall the loop
blob = open(path, "rb").read()
while True:
  t0 = time.time()
  try:
    out = classify(client, [blob], protocol=protocol, model="fashion_image")
    row = {"t0": t0, "t1": time.time(), "version": out["model_version"],
           "probs": out["probabilities"][0].tolist()}
  except Exception as e:
    row = {"t0": t0, "t1": time.time(), "error": str(e)}
  sink.write(json.dumps(row) + "\n")
  sink.flush()
  try:
    open(stop).close()
    break
  except FileNotFoundError:
    pass
"""


def _traffic(served, stop):
  s = served["server"]
  procs = []
  for url, proto in ((s.http_url, "http"), (s.grpc_url, "grpc")):
    log = str(served["tmp"] / f"traffic-{proto}.jsonl")
    procs.append((subprocess.Popen([served["env"].python, "-c", LOOP, url, proto,
                                    served["paths"][0], stop, log],
                                   stderr=subprocess.PIPE, text=True, cwd=REPO), log))
  return procs


def _wait_for_answers(procs, since: float, n: int = 3, timeout_s: float = 120.0) -> None:
  """Until every traffic client has logged n answers to requests sent after `since` (time.time);
  the timeout only bounds the wait, generously."""
  deadline = time.monotonic() + timeout_s
  while True:
    counts = []
    for p, log in procs:
      assert p.poll() is None, p.stderr.read()[-2000:]
      try:
        with open(log) as f:  # only whole lines: the client may be mid-write
          rows = [json.loads(line) for line in f if line.endswith("\n")]
      except FileNotFoundError:
        rows = []
      counts.append(sum(r["t0"] > since for r in rows))
    if min(counts) >= n:
      return
    assert time.monotonic() < deadline, f"answers after {since}: {counts}"
    time.sleep(0.05)


def _collect(procs):
  rows = []
  for p, log in procs:
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    with open(log) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  return rows


def test_promote_and_rollback_switch_the_served_version_live(served):
  """Requests keep flowing (HTTP and gRPC clients in a loop) while production moves v1 -> v2 ->
  back to v1: none fails, and every request sent after a switch returned gets the new version."""
  from jaxclf.deploy.sync import sync_serving
  s, registry = served["server"], served["registry"]
  refs = {str(v): _reference_probs(e, served["paths"][:1])[0]
          for v, e in zip((1, 2), served["exports"])}
  assert np.abs(refs["1"] - refs["2"]).max() > 1e-3  # the two versions are distinguishable
  stop = str(served["tmp"] / "stop-traffic")
  procs = _traffic(served, stop)
  try:
    # Each window lasts until both clients have answers in it (not a fixed time: on a loaded
    # machine a client can take longer than any sleep to start).
    _wait_for_answers(procs, since=0.0)
    promote_started = time.time()
    registry.promote("fashion", 2, "production", reason="v2 is better")
    out = sync_serving(registry, "fashion", served["repo"], triton_url=s.http_url)
    switched_to_2 = time.time()
    assert out["version"] == 2 and out["previous"] == 1
    _wait_for_answers(procs, since=switched_to_2)
    rollback_started = time.time()
    registry.rollback("fashion", reason="v2 regressed")
    sync_serving(registry, "fashion", served["repo"], triton_url=s.http_url)
    switched_to_1 = time.time()
    _wait_for_answers(procs, since=switched_to_1)
  finally:
    open(stop, "w").close()
  rows = _collect(procs)
  errors = [r for r in rows if "error" in r]
  assert not errors, errors[:3]
  for r in rows:  # each answer is exactly one version's output
    assert np.abs(np.array(r["probs"]) - refs[r["version"]]).max() < 1e-5
  before = [r["version"] for r in rows if r["t1"] < promote_started]
  after_2 = [r["version"] for r in rows if switched_to_2 < r["t0"] and r["t1"] < rollback_started]
  after_1 = [r["version"] for r in rows if r["t0"] > switched_to_1]
  assert before and set(before) == {"1"}
  assert after_2 and set(after_2) == {"2"}
  assert after_1 and set(after_1) == {"1"}
  # After the rollback the idle v2 of each composing model is unloaded at once: an unversioned
  # request to NAME (image_client, perf_analyzer) goes to the highest loaded version, so v2 must
  # not be left loaded.
  from jaxclf.export.triton_config import read_config
  from jaxclf.export.triton_repository import served_version
  from jaxclf.export.triton_server import repository_index
  ready = {(m["name"], m.get("version")) for m in repository_index(s.http_url)
           if m.get("state") == "READY"}
  for m in ("fashion", "fashion_preprocess", "fashion_postprocess"):
    assert (m, "1") in ready and (m, "2") not in ready, sorted(ready)
  # The repository now holds only the served version, pinned in every config.
  assert served_version(served["repo"], "fashion") == 1
  for m in ("fashion", "fashion_preprocess", "fashion_image"):
    assert list(read_config(os.path.join(served["repo"], m)).version_policy.specific.versions) == [1]
    assert sorted(e for e in os.listdir(os.path.join(served["repo"], m)) if e.isdigit()) == ["1"]


def test_start_script_prints_the_server_command(served, tmp_path):
  r = subprocess.run(["bash", os.path.join(REPO, "scripts", "start_tritonserver.sh"),
                      served["repo"], "--print-command"], capture_output=True, text=True,
                     cwd=REPO, timeout=60)
  assert r.returncode == 0, r.stderr
  cmd = r.stdout.strip()
  assert "--model-control-mode=explicit" in cmd and "--load-model=fashion_image" in cmd
  assert "--load-model=fashion_onnx" not in cmd


# ----------------------------------------------------------------------------- standard interface

def test_onnx_twin_has_the_standard_interface_and_loads_the_raw_graph(served):
  """NAME_onnx cannot load here (no onnxruntime backend), so its config is held to the contract
  by schema, it must equal NAME's interface, and the file it names must be the raw-pixel graph
  with those very tensor names, recorded in integrity.json, computing model.onnx's logits."""
  import hashlib

  import onnx

  from jaxclf.data.sources.fashion_mnist import load_arrays
  from jaxclf.data.transforms import normalize
  from jaxclf.export.onnx import ort_session, raw_pixels
  from jaxclf.export.triton_config import check_standard_interface, read_config
  repo = served["repo"]
  gpu_dir, cpu_dir = os.path.join(repo, "fashion_onnx"), os.path.join(repo, "fashion")
  gpu, cpu = read_config(gpu_dir), read_config(cpu_dir)
  interface = check_standard_interface(gpu, "fashion_onnx", gpu_dir)
  assert interface == check_standard_interface(cpu, "fashion", cpu_dir)
  assert interface == {"input": "pixels", "format": "FORMAT_NHWC", "dims": [28, 28, 1],
                       "output": "logits", "classes": 10, "label_filename": "labels.txt",
                       "max_batch_size": 64}
  assert gpu.model_warmup[0].inputs["pixels"].random_data
  path = os.path.join(gpu_dir, "1", gpu.default_model_filename)
  graph = onnx.load(path).graph
  assert [i.name for i in graph.input] == ["pixels"] and [o.name for o in graph.output] == ["logits"]
  assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == list(gpu.input[0].dims)
  data = open(path, "rb").read()
  recorded = json.load(open(os.path.join(gpu_dir, "1", "integrity.json")))
  assert recorded[gpu.default_model_filename] == hashlib.sha256(data).hexdigest()
  export = served["exports"][0]
  spec = PreprocessSpec.from_json(open(os.path.join(export, "preprocessing.json")).read())
  pixels = raw_pixels(list(load_arrays()["test"][0][300:316]), spec)
  want = ort_session(os.path.join(export, "model.onnx")).run(["logits"], {"images": normalize(pixels, spec)})[0]
  got = ort_session(data).run(["logits"], {"pixels": pixels})[0]
  assert np.abs(got - want).max() < 1e-5


def test_standard_interface_check_names_the_broken_rule(tmp_path):
  from jaxclf.export.triton_config import (TritonConfigError, check_standard_interface,
                                           model_configs, parse_pbtxt, to_pbtxt)
  good = model_configs("m", (28, 28, 1), 10, 1)["m"]
  parse = lambda cfg: parse_pbtxt(to_pbtxt(cfg))
  out = good["output"][0]
  cases = {
      "expecting 1 input and 1 output": dict(good, output=[out, dict(out, name="probabilities")]),
      "format FORMAT_NONE": dict(good, input=[{k: v for k, v in good["input"][0].items()
                                                 if k != "format"}]),
      "is TYPE_INT32": dict(good, output=[dict(out, data_type="TYPE_INT32")]),
      "no label_filename": dict(good, output=[{k: v for k, v in out.items() if k != "label_filename"}]),
      "expecting 3": dict(good, input=[dict(good["input"][0], dims=[784])]),
  }
  for why, cfg in cases.items():
    with pytest.raises(TritonConfigError, match=why):
      check_standard_interface(parse(cfg), "m/config.pbtxt")
  with pytest.raises(TritonConfigError, match="labels.txt does not exist"):
    check_standard_interface(parse(good), "m/config.pbtxt", str(tmp_path))
  (tmp_path / "labels.txt").write_text("a\nb\n")
  with pytest.raises(TritonConfigError, match="has 2 labels for 10 output classes"):
    check_standard_interface(parse(good), "m/config.pbtxt", str(tmp_path))


def _image_client(env, url, protocol, model, files, *extra):
  return subprocess.run([env.python, "-m", "serving.triton_image_client", "--url", url,
                         "--protocol", protocol, "--model", model, *extra, *files],
                        capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_image_client_contract_refuses_the_ensemble(served, protocol):
  """The contract is real: the bytes-in ensemble (3 outputs, no image format) is refused with the
  rule, as Triton's image_client refuses it."""
  s = served["server"]
  r = _image_client(served["env"], s.http_url if protocol == "http" else s.grpc_url, protocol,
                    "fashion_image", served["paths"][:1])
  assert r.returncode == 2, r.stdout + r.stderr
  assert "expecting 1 output, got 3" in json.loads(r.stderr)["error"]


def test_perf_analyzer_drives_the_classifier_with_its_own_random_data(served, tmp_path):
  """perf_analyzer needs nothing but the model's metadata for NAME: no --input-data file (short,
  bounded run on loopback)."""
  from bench.triton_perf import run_perf_analyzer
  s, env = served["server"], served["env"]
  before = urllib.request.urlopen(s.metrics_url).read().decode()
  row = run_perf_analyzer(env, "fashion", s.grpc_url, "grpc", 2, None, 500, str(tmp_path),
                          max_trials=4, stabilities=(50, 100), timeout_s=90)
  assert "error" not in row, row
  assert row["input_data"] == "random" and row["throughput_infer_per_s"] > 0
  assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
  # The served version (1 after the rollback above, which unloads the idle v2).
  key = 'nv_inference_request_success{model="fashion",version="1"}'
  count = lambda text: sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith(key))
  deadline = time.monotonic() + 10  # counters are live; the wait only covers a slow scrape
  while count(urllib.request.urlopen(s.metrics_url).read().decode()) <= count(before):
    assert time.monotonic() < deadline, "perf_analyzer's requests are not in NAME's counters"
    time.sleep(0.5)


# A trained model, so that "classifies correctly" means something: the session's run of
# configs/cnn.py:tiny as committed (tests/conftest.py single_view_tiny_run, shared with
# test_served_agreement.py and the notebooks; about 77% on its 512 test images,
# tests/test_train.py::test_the_tiny_config_learns), so no training of its own here.
CLIENT_IMAGES = range(2000, 2048)  # Fashion-MNIST test images outside the tiny run's test subset


@pytest.fixture(scope="module")
def trained_classifier(single_view_tiny_run, tmp_path_factory):
  """The trained tiny run, exported (`export_run`, as `jaxclf export` does) and served as
  `fashion` alone by a real tritonserver; the client images are real test PNGs."""
  from PIL import Image

  from jaxclf.data.sources.fashion_mnist import load_arrays
  from jaxclf.export.onnx import export_run
  from jaxclf.export.triton_repository import write_model_repository
  from jaxclf.export.triton_server import TritonServer
  env = _serving_env()
  tmp = tmp_path_factory.mktemp("triton-standard")
  run_dir, record = single_view_tiny_run
  export = export_run(run_dir, str(tmp / "export")).out_dir
  write_model_repository(export, str(tmp / "repo"), "fashion", 1)
  x, y = load_arrays()["test"]
  paths = []
  for i in CLIENT_IMAGES:
    paths.append(str(tmp / f"test{i}.png"))
    Image.fromarray(x[i, :, :, 0]).save(paths[-1])
  server = TritonServer(str(tmp / "repo"), env=env, models=["fashion"],
                        log_path=str(tmp / "triton.log")).start()
  try:
    yield {"env": env, "server": server, "export": export, "paths": paths,
           "labels": y[list(CLIENT_IMAGES)], "run_accuracy": record["metrics"]["test"]["accuracy"]}
  finally:
    server.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_standard_image_client_classifies_fashion_mnist(trained_classifier, protocol):
  """image_client's contract against NAME: metadata + config read, one NHWC FP32 input and one
  FP32 output required, raw pixels sent, class_count=3 through the classification extension.
  Every top-3 equals the gateway's own backend (onnxruntime on model.onnx, normalised input) on
  the same PNG, and most top-1 labels are right."""
  from jaxclf.data.decode import decode_image
  from serving.backends import OnnxBackend, load_bundle
  t = trained_classifier
  s = t["server"]
  r = _image_client(t["env"], s.http_url if protocol == "http" else s.grpc_url, protocol,
                    "fashion", t["paths"], "--classes", "3", "--batch-size", "16")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["interface"] == {"model": "fashion", "max_batch_size": 64, "input": "pixels",
                              "output": "logits", "format": "FORMAT_NHWC", "height": 28,
                              "width": 28, "channels": 1, "datatype": "FP32"}
  bundle = load_bundle(t["export"])
  gateway = OnnxBackend(bundle, micro_batching=False)
  x = np.stack([preprocess(decode_image(open(p, "rb").read(), 1), bundle.spec) for p in t["paths"]])
  want = gateway.run(x)
  assert len(out["results"]) == len(t["paths"])
  for row, path, ref in zip(out["results"], t["paths"], want):
    assert row["file"] == path and len(row["classes"]) == 3
    assert row["classes"][0]["index"] == int(ref.argmax())
    assert sorted(c["index"] for c in row["classes"]) == sorted(np.argsort(-ref)[:3].tolist())
    for c in row["classes"]:
      assert c["label"] == bundle.spec.class_names[c["index"]]
      assert c["score"] == pytest.approx(float(ref[c["index"]]), abs=1e-4)  # logits, 6 decimals
  top1 = np.array([row["classes"][0]["index"] for row in out["results"]])
  accuracy = float((top1 == t["labels"]).mean())
  print(json.dumps({"protocol": protocol, "accuracy": accuracy, "run_accuracy": t["run_accuracy"]}))
  assert t["run_accuracy"] > 0.6, "the fixture model did not train"
  assert accuracy >= 0.6, accuracy
