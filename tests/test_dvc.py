"""dvc.yaml + params.yaml: validated by DVC itself (default suite, with a negative test), and a
real `dvc repro` on a tiny dataset (slow): ingest -> train -> evaluate -> export all run; a
second repro runs nothing; changing one training parameter reruns train, evaluate and export
but not ingest, and the dataset version (the manifest's content hash) stays the same."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import corpus

REPO = Path(__file__).resolve().parents[1]
DVC = REPO / ".venv-lint" / "bin" / "dvc"


def dvc(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
  if not DVC.exists():
    pytest.fail(f"{DVC} missing: run scripts/setup_lint_env.sh (scripts/test.sh does)")
  # .venv/bin first: the stages call `jaxclf` and `python` of the training environment.
  env = {**{k: v for k, v in os.environ.items() if not k.startswith("JAXCLF_")},
         "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
         "DVC_NO_ANALYTICS": "1", "JAX_PLATFORMS": "cpu"}
  if os.environ.get("JAXCLF_CACHE"):
    env["JAXCLF_CACHE"] = os.environ["JAXCLF_CACHE"]
  return subprocess.run([str(DVC), *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def project(tmp_path: Path, *, code: bool = False) -> Path:
  """A DVC project in tmp_path: the pipeline files (and, with `code`, the sources it depends on)."""
  d = tmp_path / "proj"
  d.mkdir()
  for f in ("dvc.yaml", "params.yaml", ".dvcignore"):
    shutil.copy(REPO / f, d / f)
  (d / ".dvc").mkdir()
  (d / ".dvc" / "config").write_text("[core]\n    no_scm = True\n    analytics = false\n")
  if code:
    shutil.copytree(REPO / "configs", d / "configs")
    shutil.copytree(REPO / "jaxclf", d / "jaxclf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
  return d


def test_dvc_yaml_is_valid_and_wires_the_four_stages(tmp_path):
  d = project(tmp_path)
  r = dvc("stage", "list", cwd=d)
  assert r.returncode == 0, r.stderr
  assert re.findall(r"(?m)^(\w+)\s", r.stdout) == ["ingest", "train", "evaluate", "export"]
  pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
  for stage in pipeline.values():
    for dep in stage.get("deps", []):
      produced = any(dep in (o if isinstance(o, str) else next(iter(o)))
                     for s in pipeline.values() for o in s.get("outs", []))
      assert produced or "${" in dep or (REPO / dep).exists(), f"dvc.yaml dep {dep} does not exist"
  assert pipeline["train"]["deps"][0] == "data/ingested"  # train reads what ingest wrote


def test_dvc_catches_a_broken_pipeline(tmp_path):
  d = project(tmp_path)
  text = (d / "dvc.yaml").read_text()
  (d / "dvc.yaml").write_text(text.replace("${train.num_epochs}", "${train.no_such_param}"))
  r = dvc("stage", "list", cwd=d)
  assert r.returncode != 0 and "no_such_param" in r.stderr, r.stderr
  (d / "dvc.yaml").write_text(text.replace("    outs:\n      - runs/dvc", "    outz:\n      - runs/dvc"))
  r = dvc("stage", "list", cwd=d)
  assert r.returncode != 0 and "outz" in r.stderr, r.stderr


def ran(output: str) -> list[str]:
  return re.findall(r"Running stage '(\w+)'", output)


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(tmp_path):
  d = project(tmp_path, code=True)
  corpus.write_class_folder(str(d / "data" / "source"), {"bag": 20, "shoe": 20}, size=(28, 28))
  params = yaml.safe_load((d / "params.yaml").read_text())
  params["data"].update(val_fraction=0.2, test_fraction=0.2)
  params["train"].update(config="configs/cnn.py:tiny", num_epochs=1, batch_size=8)
  (d / "params.yaml").write_text(yaml.safe_dump(params))

  r = dvc("repro", cwd=d, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert ran(r.stdout) == ["ingest", "train", "evaluate", "export"]
  version = json.loads((d / "data/ingested/manifest.json").read_text())["version"]
  run = json.loads((d / "runs/dvc/run.json").read_text())
  assert run["status"] == "completed" and run["config"]["train.num_epochs"] == 1
  assert (d / "eval/dvc/metrics.json").exists() and (d / "exports/dvc/model.onnx").exists()
  lock = yaml.safe_load((d / "dvc.lock").read_text())
  assert set(lock["stages"]) == {"ingest", "train", "evaluate", "export"}

  r = dvc("repro", cwd=d, timeout=300)
  assert r.returncode == 0 and ran(r.stdout) == [], r.stdout

  params["train"]["num_epochs"] = 2
  (d / "params.yaml").write_text(yaml.safe_dump(params))
  r = dvc("repro", cwd=d, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert ran(r.stdout) == ["train", "evaluate", "export"]
  assert "'ingest' didn't change" in r.stdout
  assert json.loads((d / "data/ingested/manifest.json").read_text())["version"] == version
  run = json.loads((d / "runs/dvc/run.json").read_text())
  assert run["config"]["train.num_epochs"] == 2 and run["status"] == "completed"
  # One dataset version end to end: the manifest's hash, in the run record and the export.
  export = json.loads((d / "exports/dvc/export.json").read_text())
  assert run["dataset"]["version"] == export["source"]["dataset_version"] == version
