"""Orchestration between jaxclf's registry and MLflow's Model Registry (both audited).

  register_in_mlflow(registry, name, version, export_dir)   after `export --register NAME`
  mirror_stage(registry, name, out)                          after promote / rollback / gate

Both run only when tracking is on (MLFLOW_TRACKING_URI, or the training config's
tracking.mlflow_uri for an export). jaxclf's registry decides; MLflow follows: each mirrored
action is a note in the registry's audit log (`mlflow-register`, `mlflow-alias`) beside the
register/promote/rollback event it follows, so `jaxclf registry audit NAME` shows both.
A failure to mirror is raised as MlflowRegistryError after the jaxclf side is done: the CLI
prints one line saying what holds and how to retry.
"""
from __future__ import annotations

import os
from typing import Any

from jaxclf.registry import Registry
from jaxclf.registry.registry import SINGLE_HOLDER_STAGES

MIRRORED_STAGES = SINGLE_HOLDER_STAGES  # staging and production: an alias names one version


def _tracking(uri: str | None = None) -> str:
  return uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def register_in_mlflow(registry: Registry, name: str, version: int, export_dir: str,
                       uri: str) -> dict[str, Any]:
  from jaxclf.tracking import model_registry as mr
  try:
    info = mr.register_export(export_dir, name, uri, registry_version=version,
                              registry_root=registry.root)
  except mr.MlflowRegistryError:
    raise
  except Exception as e:  # noqa: BLE001 - the client's errors, one line
    raise mr.MlflowRegistryError(
        f"v{version} is registered in the jaxclf registry, but MLflow at {uri} refused it "
        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); retry with "
        f"`jaxclf export --register` from the same run") from None
  registry.note(name, version, "mlflow-register", mlflow_version=info["version"],
                model_uri=info["model_uri"], mlflow_run_id=info["run_id"], tracking_uri=uri)
  return info


def mirror_stage(registry: Registry, name: str, out: dict[str, Any],
                 uri: str | None = None) -> dict[str, Any] | None:
  """Moves the MLflow alias of out['stage'] to the MLflow version of out['version']; None when
  tracking is off or the stage has no alias."""
  uri = _tracking(uri)
  if not uri or out.get("stage") not in MIRRORED_STAGES:
    return None
  from jaxclf.tracking import model_registry as mr
  try:
    done = mr.mirror_stage(uri, name, out["stage"], int(out["version"]))
  except Exception as e:  # noqa: BLE001 - the client's errors, one line
    raise mr.MlflowRegistryError(
        f"v{out['version']} is {out['stage']} in the jaxclf registry, but the MLflow alias "
        f"@{mr.alias_for(out['stage'])} at {uri} was not moved "
        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); rerun the command to "
        "retry") from None
  if done.get("mlflow_version") is not None:
    registry.note(name, int(out["version"]), "mlflow-alias", alias=done["alias"],
                  mlflow_version=done["mlflow_version"], stage=out["stage"], tracking_uri=uri)
  return done
