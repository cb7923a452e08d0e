"""jaxclf models in MLflow's Model Registry, end to end on real servers: a trained run exported
and registered (`jaxclf export --register`), promoted (the MLflow alias moves), served by the
gateway (uvicorn) from `models:/NAME@production` with a prediction checked, rolled back (the alias
moves back), and the MLflow UI's registered-model page rendered in headless Chromium.
A missing alias and an altered artefact are each one error line.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import requests

from conftest import ROOT
from service_helpers import start_mlflow_server, stop

SCREENSHOT = "/tmp/jaxclf-mlflow-registered-model.png"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
  d = tmp_path_factory.mktemp("mlflow-registry")
  url, proc = start_mlflow_server(str(d), f"sqlite:///{d}/mlflow.db",
                                  ["--artifacts-destination", str(d / "artifacts")])
  try:
    yield {"url": url, "artifacts": d / "artifacts"}
  finally:
    stop(proc)


def _jaxclf(*args: str) -> tuple[int, str, str]:
  """The jaxclf CLI in this process (jax and mlflow are loaded once) -> (exit code, out, err)."""
  import contextlib
  import io
  from jaxclf.cli import main
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      rc = main(list(args))
    except SystemExit as e:
      rc = e.code
  return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def registered(single_view_tiny_run, mlflow_server, tmp_path_factory):
  """The tiny run exported and registered twice: v1 by `jaxclf export --register`, v2 by
  `jaxclf registry register` of the same export plus the same MLflow mirroring call."""
  d = tmp_path_factory.mktemp("mlflow-reg")
  mp = pytest.MonkeyPatch()
  mp.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
  mp.setenv("JAXCLF_REGISTRY", str(d / "registry"))
  mp.setenv("JAXCLF_CACHE", str(d / "cache"))
  run_dir, _ = single_view_tiny_run
  try:
    rc, out, err = _jaxclf("export", "--run", run_dir, "--out", str(d / "export"),
                           "--register", "fashion")
    assert rc == 0, err
    first = json.loads(out)["registered"]
    from jaxclf.deploy.mlflow_mirror import register_in_mlflow
    from jaxclf.registry import Registry
    reg = Registry(str(d / "registry"))
    mv2 = reg.register(str(d / "export"), "fashion")
    second = register_in_mlflow(reg, "fashion", mv2.version, str(d / "export"),
                                mlflow_server["url"])
    yield {"dir": d, "export": d / "export", "first": first, "second": second,
           "url": mlflow_server["url"], "artifacts": mlflow_server["artifacts"]}
  finally:
    mp.undo()


def _alias(url: str, alias: str) -> int:
  from mlflow.tracking import MlflowClient
  return int(MlflowClient(url, registry_uri=url).get_model_version_by_alias("fashion",
                                                                           alias).version)


def _prediction_checked(export_dir, served_url: str) -> dict:
  """One PNG through the gateway; its probabilities equal the export's own (ONNX Runtime here)."""
  from jaxclf.data.decode import decode_image
  from jaxclf.data.transforms import preprocess
  from jaxclf.evaluate.model_loader import load_model
  from serving.backends import softmax
  from test_serving import png
  model = load_model(str(export_dir))
  h, w, c = model.spec.input_shape
  img = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
  data = png(img)
  want = softmax(model.logits(preprocess(decode_image(data, c), model.spec)[None]))[0]
  r = requests.post(served_url + "/v1/predict?top_k=10",
                    files={"file": ("x.png", data, "image/png")}, timeout=30)
  assert r.status_code == 200, r.text
  got = np.zeros(len(want))
  for p in r.json()["predictions"]:
    got[p["index"]] = p["confidence"]
  np.testing.assert_allclose(got, want, atol=2e-6)  # the API rounds to 6 decimals
  return r.json()


def test_register_promote_serve_from_alias_and_roll_back(registered, tmp_path):
  from mlflow.tracking import MlflowClient
  from test_serving import Server
  url = registered["url"]
  first, second = registered["first"], registered["second"]
  assert first["version"] == 1 and first["mlflow"]["version"] == 1 and second["version"] == 2
  client = MlflowClient(url, registry_uri=url)
  v1 = client.get_model_version("fashion", "1")
  assert v1.tags["jaxclf.registry_version"] == "1" and v1.run_id == first["mlflow"]["run_id"]
  run = client.get_run(v1.run_id)  # the run that trained it: the run dir and its config
  assert run.data.tags["jaxclf.workdir"] == os.path.abspath(
      json.loads((registered["export"] / "export.json").read_text())["source"]["run_dir"])
  assert run.data.params["model.name"]
  arts = {a.path for a in client.list_artifacts(v1.run_id, "model-v1")}
  assert {f"model-v1/{f}" for f in ("model.onnx", "model_raw.onnx", "preprocessing.json",
                                 "labels.txt", "export.json", "MLmodel")} <= arts
  for version in (1, 2):
    rc, out, err = _jaxclf("registry", "promote", "fashion", str(version), "--stage", "production")
    assert rc == 0, err
    assert json.loads(out)["mlflow"]["alias"] == "production"
    assert _alias(url, "production") == version  # the alias moved with the stage
  server = Server("models:/fashion@production", tmp_path / "gateway.log",
                  env={"MLFLOW_TRACKING_URI": url, "JAXCLF_CACHE": str(tmp_path / "cache")})
  try:
    _prediction_checked(registered["export"], server.url)
    served = requests.get(server.url + "/v1/models", timeout=10).json()["models"][0]
    assert served["sha256"] == client.get_model_version("fashion", "2").tags["jaxclf.model_sha256"]
    assert served["source"].endswith(os.path.join("mlflow-models", "fashion", "2", "model-v2"))
  finally:
    server.proc.terminate()
    server.proc.wait(30)
  rc, out, err = _jaxclf("registry", "rollback", "fashion")
  assert rc == 0, err
  assert _alias(url, "production") == 1  # and back
  # the Triton model repository from the alias (the init step's command)
  rc, out, err = _jaxclf("registry", "deploy", "fashion", "--model-path",
                         "models:/fashion@production", "--model-repository",
                         str(tmp_path / "repo"), "--no-gpu")
  assert rc == 0, err
  from jaxclf.hashing import sha256_file
  raw = json.loads((registered["export"] / "export.json").read_text())["artifacts"][
      "model_raw.onnx"]
  deployed = {sha256_file(str(p)) for p in (tmp_path / "repo").rglob("model_raw.onnx")}
  assert deployed == {raw}, (out, deployed)
  audit = json.loads(_jaxclf("registry", "audit", "fashion")[1])
  actions = [(e["action"], e["version"], e.get("alias")) for e in audit]
  assert actions[-2:] == [("rollback", 1, None), ("mlflow-alias", 1, "production")]
  assert ("mlflow-register", 1, None) in actions and ("promote", 2, None) in actions


@pytest.mark.slow  # Chromium: test_report.py renders a page in it in the default suite
def test_the_registered_model_page_in_headless_chromium(registered):
  """The MLflow UI (a single-page app) rendered by Debian's chromium; the PNG is kept."""
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  assert exe, "needs Debian's chromium: apt-get install chromium"
  from jaxclf.tracking.model_registry import mirror_stage
  mirror_stage(registered["url"], "fashion", "production", 1)  # the page shows an alias
  page = f"{registered['url']}/#/models/fashion"
  flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", "--window-size=1400,900",
           "--virtual-time-budget=20000"]  # lets the app fetch and render before the capture
  dom = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=180)
  assert "fashion" in dom.stdout and "production" in dom.stdout, dom.stdout[-2000:]
  if os.path.exists(SCREENSHOT):
    os.remove(SCREENSHOT)
  subprocess.run(flags + [f"--screenshot={SCREENSHOT}", page], capture_output=True, timeout=180)
  with open(SCREENSHOT, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_alias_and_altered_artefact_are_one_line_each(registered, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXCLF_CACHE", str(tmp_path / "cache"))
  rc, _, err = _jaxclf("serve", "--model-path", "models:/fashion@champion", "--port", "1")
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "models:/fashion@champion: MLflow registered model 'fashion' has no alias @champion" \
      in err
  run_id = registered["second"]["run_id"]
  onnx = next(p for p in registered["artifacts"].rglob("model-v2/model.onnx") if run_id in str(p))
  onnx.chmod(0o644)
  onnx.write_bytes(onnx.read_bytes() + b"\0")  # one byte more in the artefact store
  rc, _, err = _jaxclf("evaluate", "--model-path", "models:/fashion/2", "--test-data", "unused")
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "models:/fashion/2: " in err and "model.onnx: sha256" in err
  assert "does not match export.json" in err
  rc, _, err = _jaxclf("registry", "deploy", "fashion", "--model-path", "models:/fashion/2",
                       "--model-repository", str(tmp_path / "repo"))
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "model.onnx: sha256" in err, err
  assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
