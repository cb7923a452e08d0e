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
  from jaxclf.export.triton import ServingEnv, ServingEnvError
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
  from jaxclf.export.triton import TritonServer
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
      "fashion_preprocess", "fashion"]
  cls = json.load(urllib.request.urlopen(f"http://{s.http_url}/v2/models/fashion/config"))
  assert cls["backend"] == "python" and "dynamic_batching" in cls
  assert cls["input"][0]["dims"] == [28, 28, 1]
  # NAME_onnx is in the repository for GPU servers but cannot load here (no onnxruntime backend).
  index = {e["name"]: e for e in json.loads(urllib.request.urlopen(urllib.request.Request(
      f"http://{s.http_url}/v2/repository/index", data=b"{}", method="POST")).read())}
  assert index["fashion_image"]["state"] == "READY"
  assert "fashion_onnx" in index and index["fashion_onnx"].get("state") != "READY"
  _client(served["env"], s.http_url, "http", served["paths"][:1])
  metrics = urllib.request.urlopen(s.metrics_url).read().decode()
  assert 'nv_inference_request_success{model="fashion_image",version="1"}' in metrics


def test_repository_configs_parse_against_triton_schema(served):
  from jaxclf.export.triton import read_config, validate_repository
  configs = validate_repository(served["repo"])
  assert set(configs) == {"fashion", "fashion_onnx", "fashion_preprocess", "fashion_image"}
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
    time.sleep(1.5)
    promote_started = time.time()
    registry.promote("fashion", 2, "production", reason="v2 is better")
    out = sync_serving(registry, "fashion", served["repo"], triton_url=s.http_url)
    switched_to_2 = time.time()
    assert out["version"] == 2 and out["previous"] == 1
    time.sleep(1.5)
    rollback_started = time.time()
    registry.rollback("fashion", reason="v2 regressed")
    sync_serving(registry, "fashion", served["repo"], triton_url=s.http_url)
    switched_to_1 = time.time()
    time.sleep(1.0)
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
  # The repository now holds only the served version, pinned in every config.
  from jaxclf.export.triton import read_config, served_version
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
