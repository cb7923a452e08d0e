"""Model registry: versions, metadata, stages with an audit log, sha256 on load, concurrent
registers from real processes, URIs, the fsspec path, and the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from jaxclf.registry import IntegrityError, Registry, RegistryError, resolve_model_uri

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  """A real export of a tiny CNN, with run metadata as `jaxclf export --run` records it."""
  import jax
  import jax.numpy as jnp

  from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
  from jaxclf.data.transforms import PreprocessSpec
  from jaxclf.export.onnx import export_model
  from jaxclf.models import create_model
  x, _ = load_arrays()["test"]
  model = create_model("cnn_tiny", num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
  out = tmp_path_factory.mktemp("reg-export") / "cnn"
  source = {"run_dir": "/runs/cnn", "checkpoint_step": 420, "dataset_version": "abc123",
            "mlflow_run_id": "0123456789abcdef",
            "config": {"model": {"name": "cnn_tiny"}},
            "metrics": {"val": {"accuracy": 0.91}, "test": {"accuracy": 0.905}}}
  export_model(model, variables, PreprocessSpec(class_names=tuple(CLASS_NAMES)), str(out),
               parity_images=list(x[:16]), source=source, model_name="cnn_tiny")
  return str(out)


@pytest.fixture
def registry(tmp_path):
  return Registry(str(tmp_path / "registry"))


def test_register_list_show_carry_the_metadata(registry, export_dir):
  mv = registry.register(export_dir, "fashion", description="first")
  assert (mv.version, mv.stage) == (1, "experimental")
  shown = registry.show("fashion", 1)
  assert shown["source"]["run_dir"] == "/runs/cnn" and shown["source"]["checkpoint_step"] == 420
  assert shown["source"]["mlflow_run_id"] == "0123456789abcdef"  # the version names its MLflow run
  assert shown["config"] == {"model": {"name": "cnn_tiny"}}
  assert shown["dataset_version"] == "abc123"
  assert shown["metrics"] == {"val": {"accuracy": 0.91}, "test": {"accuracy": 0.905}}
  assert shown["parity"]["passed"] and shown["created"] and shown["stage"] == "experimental"
  assert set(shown["artifacts"]) == {"model.onnx", "model_raw.onnx", "preprocessing.json",
                                     "labels.txt", "export.json", "reference_stats.json"}
  assert all(len(a["sha256"]) == 64 for a in shown["artifacts"].values())
  assert shown["history"][0]["action"] == "register"
  registry.register(export_dir, "fashion")
  assert [(v.version, v.stage) for v in registry.list_versions("fashion")] == [
      (1, "experimental"), (2, "experimental")]
  assert registry.names() == ["fashion"]
  assert registry.resolve("fashion", "latest") == 2


def test_versions_are_immutable(registry, export_dir, tmp_path):
  copy = tmp_path / "export-copy"
  shutil.copytree(export_dir, copy)
  registry.register(str(copy), "fashion")
  vdir = registry.open_version("fashion", 1)
  before = {f: open(os.path.join(vdir, f), "rb").read() for f in os.listdir(vdir)}
  for f in before:  # read-only on disk
    assert not os.stat(os.path.join(vdir, f)).st_mode & 0o222
  # Changing the source export afterwards does not touch the version, and cannot re-register.
  with open(copy / "labels.txt", "a") as f:
    f.write("extra\n")
  with pytest.raises(RegistryError, match="labels.txt"):
    registry.register(str(copy), "fashion")
  assert {f: open(os.path.join(vdir, f), "rb").read() for f in os.listdir(vdir)} == before
  assert registry.version_numbers("fashion") == [1]


def test_promote_rollback_and_the_audit_log(registry, export_dir):
  for _ in range(3):
    registry.register(export_dir, "fashion")
  registry.promote("fashion", 1, "production", reason="baseline")
  registry.promote("fashion", 2, "staging", reason="candidate")
  out = registry.promote("fashion", "staging", "production", reason="beats v1 on test")
  assert (out["version"], out["previous"]) == (2, 1)
  stages = {v.version: v.stage for v in registry.list_versions("fashion")}
  assert stages == {1: "archived", 2: "production", 3: "experimental"}
  back = registry.rollback("fashion", reason="v2 regressed on shirts")
  assert (back["version"], back["previous"]) == (1, 2)
  assert registry.resolve("fashion", "production") == 1
  assert registry.get("fashion", 2).stage == "archived"
  log = registry.history("fashion")
  last = [h for h in log if h["seq"] == back["seq"]]
  assert {(h["version"], h["from_stage"], h["to_stage"]) for h in last} == {
      (1, "archived", "production"), (2, "production", "archived")}
  assert [h["reason"] for h in last if h["version"] == 1] == ["v2 regressed on shirts"]
  assert all(h["time"] and h["user"] for h in log)
  # The raw log is append-only files, one per event, numbered without gaps.
  events = registry.events("fashion")
  assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_bad_requests_fail_cleanly_and_write_nothing(registry, export_dir):
  registry.register(export_dir, "fashion")
  n_events = len(registry.events("fashion"))
  with pytest.raises(RegistryError, match=r"has no version 7 \(versions: 1\)"):
    registry.promote("fashion", 7, "production")
  with pytest.raises(RegistryError, match="unknown stage 'prod'"):
    registry.promote("fashion", 1, "prod")
  with pytest.raises(RegistryError, match="no model named 'fahsion'"):
    registry.promote("fahsion", 1, "production")
  with pytest.raises(RegistryError, match="no production version"):
    registry.rollback("fashion")
  registry.promote("fashion", 1, "production")
  with pytest.raises(RegistryError, match="nothing to roll back to"):
    registry.rollback("fashion")
  with pytest.raises(RegistryError, match="model name"):
    registry.register(export_dir, "../escape")
  assert len(registry.events("fashion")) == n_events + 1


def test_tampered_artefacts_refuse_to_load(registry, export_dir):
  registry.register(export_dir, "fashion")
  registry.register(export_dir, "fashion")
  vdir = registry.open_version("fashion", 1)
  onnx_path = os.path.join(vdir, "model.onnx")
  os.chmod(onnx_path, 0o644)
  with open(onnx_path, "r+b") as f:
    f.seek(100)
    f.write(b"\x00\x01")
  with pytest.raises(IntegrityError, match="model.onnx has sha256 .* modified after registration"):
    registry.open_version("fashion", 1)
  with pytest.raises(IntegrityError):
    resolve_model_uri("registry:fashion@1", root=registry.root)
  # Rewriting version.json to match the tampered file is caught by the hash in the audit log.
  v2 = os.path.join(registry.store.path("fashion", "versions", 2), "version.json")
  meta = json.load(open(v2))
  meta["artifacts"]["labels.txt"]["sha256"] = "0" * 64
  os.chmod(v2, 0o644)
  json.dump(meta, open(v2, "w"))
  with pytest.raises(IntegrityError, match="version.json does not match"):
    registry.open_version("fashion", 2)


def test_resolve_model_uri(registry, export_dir):
  registry.register(export_dir, "fashion")
  registry.register(export_dir, "fashion")
  registry.promote("fashion", 2, "production")
  root = registry.root
  assert resolve_model_uri("registry:fashion", root=root).endswith("/versions/2")
  assert resolve_model_uri("registry:fashion@1", root=root).endswith("/versions/1")
  assert resolve_model_uri(f"registry:fashion@production?root={root}").endswith("/versions/2")
  assert resolve_model_uri(export_dir) == export_dir
  with pytest.raises(RegistryError, match="no version in stage 'staging'"):
    resolve_model_uri("registry:fashion@staging", root=root)
  with pytest.raises(RegistryError, match="neither a registry URI"):
    resolve_model_uri("/no/such/dir")


def test_fsspec_store_downloads_and_verifies(export_dir, tmp_path):
  """A non-local fsspec filesystem (memory://, the same code path as s3://): files are put and
  fetched through fsspec, exclusive creates use open(..., 'xb'), loads are verified copies."""
  reg = Registry(f"memory://jaxclf-test-{tmp_path.name}", cache_dir=str(tmp_path / "cache"))
  assert not reg.store.local
  assert reg.register(export_dir, "fashion").version == 1
  assert reg.register(export_dir, "fashion").version == 2
  reg.promote("fashion", 2, "production")
  local = reg.open_version("fashion", "production")
  assert local.startswith(str(tmp_path / "cache"))
  assert open(os.path.join(local, "labels.txt")).read() == open(
      os.path.join(export_dir, "labels.txt")).read()
  # The cache is content-checked: a verified copy stays usable; a version fetched after its
  # stored file was altered is refused.
  reg.store.fs.pipe_file(reg.store.path("fashion", "versions", 1, "labels.txt"), b"tampered\n")
  with pytest.raises(IntegrityError, match="labels.txt"):
    reg.open_version("fashion", 1)
  os.chmod(os.path.join(local, "model.onnx"), 0o644)
  with open(os.path.join(local, "model.onnx"), "ab") as f:
    f.write(b"junk")  # a corrupted cache entry is fetched again, then verified
  assert reg.open_version("fashion", 2) == local


REGISTER_WHEN_TOLD = r"""
import os, sys, time
root, export_dir, go = sys.argv[1:4]
from jaxclf.registry import Registry
reg = Registry(root)
while not os.path.exists(go):
  time.sleep(0.002)
print(reg.register(export_dir, "fashion").version)
"""


def test_concurrent_registers_never_share_a_version(registry, export_dir, tmp_path):
  """Real processes, released together: every one gets its own number, all versions load."""
  go = tmp_path / "go"
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, "-c", REGISTER_WHEN_TOLD, registry.root, export_dir,
                             str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for _ in range(6)]
  time.sleep(1.5)  # let them all import and wait at the line
  go.touch()
  versions = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    versions.append(int(out.strip()))
  assert sorted(versions) == [1, 2, 3, 4, 5, 6]
  assert registry.version_numbers("fashion") == [1, 2, 3, 4, 5, 6]
  assert [e["seq"] for e in registry.events("fashion")] == [1, 2, 3, 4, 5, 6]
  for v in versions:
    registry.verify("fashion", v)


def _cli(capsys, *argv):
  from jaxclf.deploy.cli import main
  rc = main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_register_list_show_promote_rollback(capsys, export_dir, tmp_path):
  root = ["registry", "--root", str(tmp_path / "reg")]
  rc, out, _ = _cli(capsys, *root, "register", export_dir, "--name", "fashion")
  assert rc == 0 and json.loads(out)["version"] == 1
  _cli(capsys, *root, "register", export_dir, "--name", "fashion")
  rc, out, _ = _cli(capsys, *root, "list", "fashion")
  assert rc == 0 and out.splitlines()[0].split()[:3] == ["name", "version", "stage"]
  assert len(out.splitlines()) == 3 and "0.9050" in out
  rc, out, _ = _cli(capsys, *root, "promote", "fashion", "1", "--stage", "production",
                    "--reason", "first")
  assert rc == 0 and json.loads(out)["version"] == 1
  _cli(capsys, *root, "promote", "fashion", "2", "--stage", "production")
  rc, out, _ = _cli(capsys, *root, "rollback", "fashion", "--reason", "oops")
  assert rc == 0 and json.loads(out)["version"] == 1
  rc, out, _ = _cli(capsys, *root, "show", "fashion", "production")
  shown = json.loads(out)
  assert shown["version"] == 1 and shown["history"][-1]["reason"] == "oops"
  rc, out, err = _cli(capsys, *root, "promote", "fashion", "9", "--stage", "production")
  assert rc == 2 and "has no version 9" in err and not out
  rc, _, err = _cli(capsys, *root, "verify", "fashion", "1")
  assert rc == 0


def test_promote_rewrites_the_triton_model_repository(capsys, export_dir, tmp_path):
  """Offline (no server): the repository follows production. Needs the serving venv for Triton's
  ModelConfig schema (scripts/setup_serving_env.sh)."""
  from jaxclf.export.triton_config import read_config
  from jaxclf.export.triton_repository import served_version
  root = ["registry", "--root", str(tmp_path / "reg")]
  repo = str(tmp_path / "model_repository")
  for _ in range(2):
    _cli(capsys, *root, "register", export_dir, "--name", "fashion")
  rc, out, err = _cli(capsys, *root, "promote", "fashion", "1", "--stage", "production",
                      "--model-repository", repo)
  assert rc == 0, err
  assert served_version(repo, "fashion") == 1
  _cli(capsys, *root, "promote", "fashion", "2", "--stage", "production", "--model-repository", repo)
  assert served_version(repo, "fashion") == 2
  assert read_config(os.path.join(repo, "fashion")).version_policy.specific.versions == [2]
  assert sorted(e for e in os.listdir(os.path.join(repo, "fashion")) if e.isdigit()) == ["2"]
  _cli(capsys, *root, "rollback", "fashion", "--model-repository", repo)
  assert served_version(repo, "fashion") == 1
  # Staging changes do not touch what production serves.
  _cli(capsys, *root, "promote", "fashion", "2", "--stage", "staging", "--model-repository", repo)
  assert served_version(repo, "fashion") == 1


def test_s3_registry_with_concurrent_registers(s3_bucket, export_dir, tmp_path):
  """The team setup: the registry on S3 (moto's S3 server here). Version numbers are taken with
  conditional writes (If-None-Match), so concurrent registers from real processes still never
  share a number; loads download into the cache and verify."""
  _, bucket = s3_bucket
  root = f"s3://{bucket}/registry"
  go = tmp_path / "go"
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "JAXCLF_CACHE": str(tmp_path / "cache")}
  procs = [subprocess.Popen([sys.executable, "-c", REGISTER_WHEN_TOLD, root, export_dir, str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for _ in range(4)]
  time.sleep(2.0)
  go.touch()
  versions = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    versions.append(int(out.strip()))
  assert sorted(versions) == [1, 2, 3, 4]
  reg = Registry(root, cache_dir=str(tmp_path / "cache"))
  assert reg.version_numbers("fashion") == [1, 2, 3, 4]
  reg.promote("fashion", 3, "production", reason="on S3")
  local = resolve_model_uri(f"registry:fashion@production?root={root}")
  assert sorted(os.listdir(local)) == sorted([*reg.show("fashion", 3)["artifacts"], "version.json"])


def _export_with_source(export_dir, dest, **source):
  """A copy of the export whose export.json claims another run (export.json is not hashed)."""
  shutil.copytree(export_dir, dest)
  path = os.path.join(dest, "export.json")
  meta = json.load(open(path))
  meta["source"].update(source)
  with open(path, "w") as f:
    json.dump(meta, f)
  return str(dest)


def test_accuracy_shown_is_single_view_and_tta_is_apart(registry, export_dir, tmp_path, capsys):
  """The model's accuracy is run.json metrics.test (single view, what the export serves); a
  flip-TTA figure (metrics.test_tta) is only ever a separate, labelled field."""
  tta_run = _export_with_source(
      export_dir, tmp_path / "tta", config={"train": {"tta_flip": True}},
      metrics={"val": {"accuracy": 0.91}, "test": {"accuracy": 0.9, "count": 10000},
               "test_tta": {"accuracy": 0.912, "count": 10000}})
  mv = registry.register(tta_run, "fashion")
  assert mv.metadata["metrics"]["test"]["accuracy"] == 0.9
  assert mv.metadata["metrics"]["test_tta"]["accuracy"] == 0.912
  s = mv.summary()
  assert s["test_accuracy"] == 0.9 and s["test_tta_accuracy"] == 0.912
  assert s["temperature"] == 1.0  # the fixture's spec is uncalibrated
  shown = registry.show("fashion", 1)
  assert shown["accuracy"]["test"] == 0.9 and shown["accuracy"]["test_tta"] == 0.912
  assert "single view" in shown["accuracy"]["basis"] and "test_tta_note" in shown["accuracy"]
  # A run recorded before single-view metrics existed: its metrics.test is a TTA figure, so it
  # is shown as test_tta and the single-view accuracy is left empty, not filled with it.
  legacy = _export_with_source(
      export_dir, tmp_path / "legacy", config={"train": {"tta_flip": True}},
      metrics={"val": {"accuracy": 0.91}, "test": {"accuracy": 0.912, "count": 10000}})
  s2 = registry.register(legacy, "fashion").summary()
  assert s2["test_accuracy"] is None and s2["test_tta_accuracy"] == 0.912
  assert "not recorded" in registry.show("fashion", 2)["accuracy"]["basis"]
  # The plain fixture (no TTA in its config): metrics.test is the accuracy, no TTA column value.
  s3 = registry.register(export_dir, "fashion").summary()
  assert s3["test_accuracy"] == 0.905 and s3["test_tta_accuracy"] is None
  from jaxclf.deploy.cli import main
  capsys.readouterr()
  assert main(["registry", "--root", registry.root, "list", "fashion"]) == 0
  lines = capsys.readouterr().out.splitlines()
  header = lines[0].split()
  assert header[4:6] == ["test_accuracy", "test_tta_accuracy"]
  rows = [dict(zip(header, line.split())) for line in lines[1:]]
  assert rows[0]["test_accuracy"] == "0.9000" and rows[0]["test_tta_accuracy"] == "0.9120"
