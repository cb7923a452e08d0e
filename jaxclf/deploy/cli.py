"""`jaxclf export` and `jaxclf registry ...` (added to the main CLI by
`add_export_and_registry_commands`): the commands that move a model from a run to serving.

  jaxclf export --run runs/cnn [--checkpoint best|latest|STEP] --out exports/cnn
  jaxclf registry register exports/cnn --name fashion          -> version N, stage experimental
  jaxclf registry list [fashion] ; jaxclf registry show fashion 3|production
  jaxclf registry promote fashion 3 --stage production --reason "beats v2 on test"
  jaxclf registry rollback fashion                              production -> the previous holder
  jaxclf registry deploy fashion --model-repository model_repository/ [--triton-url host:8000]
  jaxclf registry deploy fashion --model-path models:/fashion@production --model-repository R
  jaxclf registry verify fashion 3
  jaxclf registry gate fashion staging --floor 0.85     promote if it beats production (exit 1: refused)
  jaxclf registry audit fashion                         the event log, gate verdicts included
  jaxclf registry dataset-changed fashion --manifest data/fashion/manifest.json   (retrain trigger)

promote/rollback/deploy with --model-repository (or $JAXCLF_MODEL_REPOSITORY) rewrite the Triton
model repository to serve the production version; with --triton-url (or $JAXCLF_TRITON_URL) the
running server reloads it live. The registry root is --root, else $JAXCLF_REGISTRY, else
./registry_store. Nothing heavy is imported until a command runs.

Both groups sit in the orchestration layer because they drive several layers at once: `export
--register` exports (jaxclf/export/), registers (jaxclf/registry/) and mirrors the new version
into MLflow (mlflow_mirror.py here); promote, rollback and deploy rewrite the Triton repository
(sync.py), and gate runs gate.py. export/ and registry/ import nothing from here.

With MLflow tracking on ($MLFLOW_TRACKING_URI, or the run's tracking.mlflow_uri for export),
`export --register` also registers the export in MLflow's Model Registry, and promote/rollback/
gate move the stage's MLflow alias (jaxclf/deploy/mlflow_mirror.py; docs/mlflow.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence


def _errors() -> tuple[type[BaseException], ...]:
  from jaxclf.export.onnx import ExportError
  from jaxclf.export.serving_env import ServingEnvError
  from jaxclf.export.triton_config import TritonConfigError
  from jaxclf.export.triton_server import TritonServerError
  from jaxclf.registry import RegistryError
  from jaxclf.tracking.model_registry import MlflowRegistryError
  return (ExportError, RegistryError, TritonConfigError, ServingEnvError, TritonServerError,
          FileNotFoundError, MlflowRegistryError)


def _guard(fn):
  def run(args) -> int:
    try:
      return int(fn(args) or 0)
    except _errors() as e:
      print(f"jaxclf: error: {e}", file=sys.stderr)
      return 2
  return run


def _print(obj: Any) -> None:
  print(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------- export

def _export(args) -> int:
  from jaxclf.export.onnx import export_run
  which: str | int = int(args.checkpoint) if str(args.checkpoint).isdigit() else args.checkpoint
  result = export_run(args.run, args.out, which=which, overwrite=args.overwrite,
                      tolerance=args.tolerance, full_test_parity=args.full_test_parity)
  out: dict[str, Any] = {"export_dir": result.out_dir, "parity": result.parity,
                         "accuracy": result.metadata.get("accuracy"),
                         "temperature": (result.metadata.get("calibration") or {}).get("temperature"),
                         "artifacts": result.artifacts}
  if args.register:
    from jaxclf.registry import Registry
    reg = Registry(args.root)
    mv = reg.register(result.out_dir, args.register)
    out["registered"] = {"name": mv.name, "version": mv.version, "stage": mv.stage}
    from jaxclf.tracking.model_registry import tracking_uri
    uri = tracking_uri(result.metadata)
    if uri:
      from jaxclf.deploy.mlflow_mirror import register_in_mlflow
      out["registered"]["mlflow"] = register_in_mlflow(reg, mv.name, mv.version, result.out_dir,
                                                       uri)
  _print(out)
  return 0


# ----------------------------------------------------------------------------- registry

def _registry(args):
  from jaxclf.registry import Registry
  return Registry(args.root)


def _register(args) -> int:
  mv = _registry(args).register(args.export_dir, args.name, description=args.description,
                                stage=args.stage, reason=args.reason)
  _print({"name": mv.name, "version": mv.version, "stage": mv.stage,
          "model_sha256": mv.metadata["artifacts"]["model.onnx"]["sha256"]})
  return 0


def _list(args) -> int:
  reg = _registry(args)
  names = [args.name] if args.name else reg.names()
  rows = [mv.summary() for n in names for mv in reg.list_versions(n)]
  if args.json:
    _print(rows)
    return 0
  if not rows:
    print(f"registry {reg.root}: no models")
    return 0
  # test_accuracy is the single-view figure (the model as served); a flip-TTA figure, when a run
  # recorded one, gets its own labelled column and never stands in for it.
  cols = ("name", "version", "stage", "created", "test_accuracy", "dataset_version", "source_run")
  extra = tuple(c for c in ("test_tta_accuracy", "temperature") if any(r.get(c) is not None
                                                                      for r in rows))
  cols = cols[:5] + extra + cols[5:]
  table = [[("" if r[c] is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])))
            for c in cols] for r in rows]
  widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
  for t in table:
    print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
  return 0


def _show(args) -> int:
  _print(_registry(args).show(args.name, args.ref))
  return 0


def _verify(args) -> int:
  reg = _registry(args)
  version = reg.resolve(args.name, args.ref)
  meta = reg.verify(args.name, version)
  _print({"name": args.name, "version": version, "verified": sorted(meta["artifacts"])})
  return 0


def _serving_target(args) -> tuple[str | None, str | None]:
  return (args.model_repository or os.environ.get("JAXCLF_MODEL_REPOSITORY"),
          args.triton_url or os.environ.get("JAXCLF_TRITON_URL"))


def _sync(args, reg, out: dict[str, Any]) -> None:
  repo, url = _serving_target(args)
  if repo and out.get("stage") == "production":
    from jaxclf.deploy.sync import sync_serving
    out["serving"] = sync_serving(reg, args.name, repo, triton_url=url,
                                  serving_name=args.serving_name)
  from jaxclf.deploy.mlflow_mirror import mirror_stage  # after serving: jaxclf's side first
  mirrored = mirror_stage(reg, args.name, out)
  if mirrored:
    out["mlflow"] = mirrored


def _promote(args) -> int:
  reg = _registry(args)
  out = reg.promote(args.name, args.ref, args.stage, reason=args.reason)
  _sync(args, reg, out)
  _print(out)
  return 0


def _rollback(args) -> int:
  reg = _registry(args)
  out = reg.rollback(args.name, args.stage, reason=args.reason)
  _sync(args, reg, out)
  _print(out)
  return 0


def _deploy(args) -> int:
  reg = _registry(args)
  repo, url = _serving_target(args)
  if not repo:
    print("jaxclf: error: registry deploy needs --model-repository (or $JAXCLF_MODEL_REPOSITORY)",
          file=sys.stderr)
    return 2
  from jaxclf.deploy.sync import sync_serving
  if args.model_path:
    from jaxclf.deploy.sync import sync_export
    _print(sync_export(args.model_path, repo, args.serving_name or args.name, triton_url=url,
                       gpu=not args.no_gpu))
    return 0
  _print(sync_serving(reg, args.name, repo, stage=args.stage, triton_url=url,
                      serving_name=args.serving_name, gpu=not args.no_gpu))
  return 0


def _gate(args) -> int:
  from jaxclf.deploy.gate import run_gate
  reg = _registry(args)
  result = run_gate(reg, args.name, args.candidate, floor=args.floor, min_delta=args.min_delta,
                    promote_to=None if args.promote_to == "none" else args.promote_to,
                    reason=args.reason)
  out = result.to_dict()
  if result.promoted:
    _sync(args, reg, out["promoted"])
  _print(out)
  return 0 if result.passed else 1  # 1: refused (CI fails the job); 2: an error


def _audit(args) -> int:
  _print(_registry(args).events(args.name))
  return 0


def _dataset_changed(args) -> int:
  from jaxclf.deploy.gate import dataset_changed
  out = dataset_changed(_registry(args), args.name, args.manifest, stage=args.stage)
  _print(out)
  return 0 if out["changed"] else 1  # 0: retrain (shell-friendly `if`), 1: nothing new


def _serving_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model-repository", help="Triton model repository to update "
                 "(default $JAXCLF_MODEL_REPOSITORY; none: registry only)")
  p.add_argument("--triton-url", help="running server to reload, host:port of its HTTP endpoint "
                 "(default $JAXCLF_TRITON_URL)")
  p.add_argument("--serving-name", help="Triton model name (default: the registry name)")


def add_export_and_registry_commands(subparsers) -> None:
  _add_export_command(subparsers)
  _add_registry_commands(subparsers)


def _add_export_command(subparsers) -> None:
  e = subparsers.add_parser("export", help="export a run's checkpoint to ONNX (parity-checked)")
  e.add_argument("--run", required=True, help="training run directory")
  e.add_argument("--checkpoint", default="best", help="best | latest | STEP")
  e.add_argument("--out", required=True, help="export directory to create")
  e.add_argument("--overwrite", action="store_true")
  e.add_argument("--tolerance", type=float, default=1e-4, help="max |Δlogit| vs JAX")
  e.add_argument("--full-test-parity", action="store_true",
                 help="also compare ONNX and JAX on the whole test split (recorded in export.json)")
  e.add_argument("--register", metavar="NAME", help="register the export under NAME afterwards")
  e.add_argument("--root", help="registry root for --register")
  e.set_defaults(func=_guard(_export))


def _add_registry_commands(subparsers) -> None:
  from jaxclf.registry.registry import STAGES  # light: no jax, no onnx

  r = subparsers.add_parser("registry", help="model registry: register, list, show, promote, rollback")
  r.add_argument("--root", help="registry root: a directory or fsspec URL (default "
                 "$JAXCLF_REGISTRY, else ./registry_store)")
  rs = r.add_subparsers(dest="registry_command", required=True)

  p = rs.add_parser("register", help="add an export directory as a new version")
  p.add_argument("export_dir")
  p.add_argument("--name", required=True)
  p.add_argument("--description", default="")
  p.add_argument("--stage", default="experimental", choices=STAGES)
  p.add_argument("--reason", default="")
  p.set_defaults(func=_guard(_register))

  p = rs.add_parser("list", help="versions with stage, metrics and source run")
  p.add_argument("name", nargs="?")
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=_guard(_list))

  p = rs.add_parser("show", help="one version's metadata and stage history")
  p.add_argument("name")
  p.add_argument("ref", nargs="?", default="latest", help="version number, stage or latest")
  p.set_defaults(func=_guard(_show))

  p = rs.add_parser("verify", help="re-hash a version's files against their recorded sha256")
  p.add_argument("name")
  p.add_argument("ref", nargs="?", default="production")
  p.set_defaults(func=_guard(_verify))

  p = rs.add_parser("promote", help="move a version to a stage (audited)")
  p.add_argument("name")
  p.add_argument("ref", help="version number (or a stage, e.g. staging)")
  p.add_argument("--stage", required=True, choices=STAGES)
  p.add_argument("--reason", default="")
  _serving_flags(p)
  p.set_defaults(func=_guard(_promote))

  p = rs.add_parser("rollback", help="give production back to the version that held it before")
  p.add_argument("name")
  p.add_argument("--stage", default="production", choices=("production", "staging"))
  p.add_argument("--reason", default="")
  _serving_flags(p)
  p.set_defaults(func=_guard(_rollback))

  p = rs.add_parser("gate", help="evaluation gate: promote CANDIDATE only if it beats production "
                    "on val accuracy and clears the test-accuracy floor (exit 1 when refused)")
  p.add_argument("name")
  p.add_argument("candidate", help="version number or stage (e.g. staging)")
  p.add_argument("--floor", type=float, required=True,
                 help="minimum single-view test accuracy (the regression floor)")
  p.add_argument("--min-delta", type=float, default=0.0,
                 help="val accuracy the candidate must gain over production (default 0)")
  p.add_argument("--promote-to", default="production", choices=("production", "staging", "none"))
  p.add_argument("--reason", default="")
  _serving_flags(p)
  p.set_defaults(func=_guard(_gate))

  p = rs.add_parser("audit", help="the audit log: every register, promote, rollback and gate event")
  p.add_argument("name")
  p.set_defaults(func=_guard(_audit))

  p = rs.add_parser("dataset-changed", help="exit 0 if a manifest's dataset version differs from "
                    "the one production was trained on (the retraining trigger), else 1")
  p.add_argument("name")
  p.add_argument("--manifest", required=True, help="manifest.json of a fresh ingest")
  p.add_argument("--stage", default="production")
  p.set_defaults(func=_guard(_dataset_changed))

  p = rs.add_parser("deploy", help="write a stage's version into a Triton model repository")
  p.add_argument("name")
  p.add_argument("--stage", default="production")
  p.add_argument("--no-gpu", action="store_true", help="leave out NAME_onnx")
  p.add_argument("--model-path", help="deploy this model instead of the registry's --stage: "
                 "models:/NAME@ALIAS or models:/NAME/VERSION (MLflow's registry; needs "
                 "$MLFLOW_TRACKING_URI), registry:NAME@stage, or an export dir")
  _serving_flags(p)
  p.set_defaults(func=_guard(_deploy))


def main(argv: Sequence[str] | None = None) -> int:
  """Standalone entry (python -m jaxclf.deploy.cli ...), same commands as `jaxclf`."""
  parser = argparse.ArgumentParser(prog="python -m jaxclf.deploy.cli")
  add_export_and_registry_commands(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
