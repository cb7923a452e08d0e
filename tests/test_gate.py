"""`jaxclf registry gate`: a worse candidate is refused, a better one promoted, and the audit log
shows both verdicts. Also the retraining trigger and the registry -> export layering.

The export directories are written in the export format (jaxclf.artifacts: the four files and
export.json with their sha256s) with chosen metrics: the gate reads only what the registry
recorded, so no model has to be trained for it.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from jaxclf.artifacts import EXPORT_FORMAT
from jaxclf.hashing import sha256_file
from jaxclf.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def make_export(d: Path, val: float, test: float, dataset_version: str = "ds-1") -> str:
  d.mkdir(parents=True)
  (d / "model.onnx").write_bytes(f"weights for val={val}".encode())
  (d / "preprocessing.json").write_text(json.dumps({"image_size": [28, 28], "channels": 1}))
  (d / "labels.txt").write_text("a\nb\n")
  artifacts = {f: sha256_file(str(d / f)) for f in ("model.onnx", "preprocessing.json", "labels.txt")}
  meta = {"format": EXPORT_FORMAT, "artifacts": artifacts,
          "source": {"run_dir": f"runs/{d.name}", "dataset_version": dataset_version,
                     "metrics": {"val": {"accuracy": val}, "test": {"accuracy": test, "count": 100}}}}
  (d / "export.json").write_text(json.dumps(meta))
  return str(d)


def cli(*argv: str) -> int:
  from jaxclf.deploy.cli import main
  return main(list(argv))


def stage_of(reg: Registry, version: int) -> str:
  return next(mv.stage for mv in reg.list_versions("fashion") if mv.version == version)


def test_gate_refuses_worse_candidate_promotes_better_and_audits_both(tmp_path, capsys):
  root = str(tmp_path / "registry")
  reg = Registry(root)
  reg.register(make_export(tmp_path / "v1", val=0.90, test=0.89), "fashion")
  reg.promote("fashion", 1, "production", reason="first model")
  reg.register(make_export(tmp_path / "v2", val=0.88, test=0.87), "fashion")
  reg.register(make_export(tmp_path / "v3", val=0.92, test=0.91), "fashion")
  reg.register(make_export(tmp_path / "v4", val=0.95, test=0.80), "fashion")
  capsys.readouterr()

  # Worse on val than production: refused, exit 1, production unchanged.
  assert cli("registry", "--root", root, "gate", "fashion", "2", "--floor", "0.85") == 1
  out = json.loads(capsys.readouterr().out)
  assert out["passed"] is False and out["production"] == 1 and out["promoted"] is None
  assert [c["check"] for c in out["checks"] if not c["passed"]] == ["beats_production"]
  assert reg.resolve("fashion", "production") == 1

  # Better on val, above the floor: promoted to production, v1 archived.
  assert cli("registry", "--root", root, "gate", "fashion", "3", "--floor", "0.85",
             "--reason", "nightly retrain") == 0
  out = json.loads(capsys.readouterr().out)
  assert out["passed"] is True and out["promoted"]["version"] == 3
  assert reg.resolve("fashion", "production") == 3 and stage_of(reg, 1) == "archived"

  # Best val but under the test-accuracy floor: refused by the floor alone.
  assert cli("registry", "--root", root, "gate", "fashion", "4", "--floor", "0.85") == 1
  out = json.loads(capsys.readouterr().out)
  assert [c["check"] for c in out["checks"] if not c["passed"]] == ["accuracy_floor"]
  assert reg.resolve("fashion", "production") == 3

  # The audit log holds every verdict, refusals included, and the promote the pass caused.
  assert cli("registry", "--root", root, "audit", "fashion") == 0
  events = json.loads(capsys.readouterr().out)
  gates = [(e["version"], e["result"]) for e in events if e["action"] == "gate"]
  assert gates == [(2, "refused"), (3, "passed"), (4, "refused")]
  promote = [e for e in events if e["action"] == "promote" and e["version"] == 3]
  assert len(promote) == 1 and "passed the evaluation gate against v1" in promote[0]["reason"]
  assert all(e.get("user") and e.get("time") for e in events)
  # Gate notes change no stage: the stage history is only register/promote/replaced.
  assert {h["action"] for h in reg.history("fashion")} <= {"register", "promote", "replaced"}

  # One-command rollback gives production back to v1.
  assert cli("registry", "--root", root, "rollback", "fashion") == 0
  assert reg.resolve("fashion", "production") == 1


def test_gate_with_no_production_needs_the_floor_only(tmp_path, capsys):
  root = str(tmp_path / "registry")
  reg = Registry(root)
  reg.register(make_export(tmp_path / "v1", val=0.90, test=0.89), "fashion")
  assert cli("registry", "--root", root, "gate", "fashion", "1", "--floor", "0.95",
             "--promote-to", "staging") == 1
  assert cli("registry", "--root", root, "gate", "fashion", "1", "--floor", "0.85",
             "--promote-to", "staging") == 0
  assert reg.resolve("fashion", "staging") == 1
  # A missing figure is a failed check, never a pass.
  d = Path(make_export(tmp_path / "v2", val=0.99, test=0.99))
  meta = json.loads((d / "export.json").read_text())
  meta["source"]["metrics"]["test"] = None
  (d / "export.json").write_text(json.dumps(meta))
  reg.register(str(d), "fashion")
  capsys.readouterr()
  assert cli("registry", "--root", root, "gate", "fashion", "2", "--floor", "0.5",
             "--promote-to", "staging") == 1
  out = json.loads(capsys.readouterr().out)
  assert [c["check"] for c in out["checks"] if not c["passed"]] == ["accuracy_floor"]
  assert reg.resolve("fashion", "staging") == 1


def test_dataset_changed_is_the_retraining_trigger(tmp_path, capsys):
  root = str(tmp_path / "registry")
  reg = Registry(root)
  reg.register(make_export(tmp_path / "v1", val=0.9, test=0.9, dataset_version="abc123"), "fashion")
  reg.promote("fashion", 1, "production")
  manifest = tmp_path / "manifest.json"
  manifest.write_text(json.dumps({"version": "abc123"}))
  assert cli("registry", "--root", root, "dataset-changed", "fashion", "--manifest", str(manifest)) == 1
  capsys.readouterr()
  manifest.write_text(json.dumps({"version": "def456"}))
  assert cli("registry", "--root", root, "dataset-changed", "fashion", "--manifest", str(manifest)) == 0
  assert json.loads(capsys.readouterr().out) == {
      "manifest_version": "def456", "production_dataset_version": "abc123", "changed": True}


def _jaxclf_imports(path: Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return {m for m in out if m.startswith(("jaxclf", "serving"))}


@pytest.mark.parametrize("module", sorted(p.name for p in (REPO / "jaxclf/registry").glob("*.py")))
def test_registry_knows_nothing_of_export_or_deploy(module):
  """The arrow goes one way: export/, deploy/ and the CLI import the registry, never back."""
  bad = {m for m in _jaxclf_imports(REPO / "jaxclf/registry" / module)
         if m.startswith(("jaxclf.export", "jaxclf.deploy", "jaxclf.train", "serving"))}
  assert not bad, f"jaxclf/registry/{module} imports {sorted(bad)}"


def test_artifact_format_module_is_a_foundation():
  assert _jaxclf_imports(REPO / "jaxclf/artifacts.py") == {"jaxclf.hashing"}
