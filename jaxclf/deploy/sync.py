"""Keeps a Triton model repository serving a registry stage (production by default).

`sync_serving` writes the stage's current version into the repository
(jaxclf.export.triton_repository rewrites the version directories and configs) and, given the URL
of a server running in explicit model-control mode, switches it live (`live_update`): requests in
flight finish on the old version, the next ones get the new one. A server started in poll mode
picks the change up by itself (--repository-poll-secs).
"""
from __future__ import annotations

from typing import Any

from jaxclf.registry import Registry


def sync_serving(registry: Registry, name: str, repo_dir: str, *, stage: str = "production",
                 triton_url: str | None = None, serving_name: str | None = None,
                 gpu: bool = True) -> dict[str, Any]:
  from jaxclf.export.triton_config import ServingOptions
  from jaxclf.export.triton_repository import live_update, prepare_update, write_model_repository
  version = registry.resolve(name, stage)
  export_dir = registry.open_version(name, version)  # sha256-verified
  options = ServingOptions(gpu=gpu)
  if not triton_url:
    return write_model_repository(export_dir, repo_dir, serving_name or name, version, options)
  update = prepare_update(export_dir, repo_dir, serving_name or name, version, options)
  return live_update(update, triton_url)


def sync_export(model_path: str, repo_dir: str, serving_name: str, *,
                triton_url: str | None = None, gpu: bool = True) -> dict[str, Any]:
  """Deploys a model named by URI rather than by a registry stage: models:/NAME@alias or
  models:/NAME/N (MLflow's registry, downloaded and sha256-checked), registry:NAME@stage, or an
  export dir. The Triton version number is the MLflow or jaxclf registry version (1 for a dir)."""
  from jaxclf.export.triton_config import ServingOptions
  from jaxclf.export.triton_repository import live_update, prepare_update, write_model_repository
  if model_path.startswith("models:/"):
    from jaxclf.tracking.model_registry import fetch_model
    export_dir, version = fetch_model(model_path)
  else:
    from jaxclf.registry.uri import parse_model_uri, resolve_model_uri
    export_dir = resolve_model_uri(model_path)
    version = 1
    if model_path.startswith("registry:"):
      name, ref, root = parse_model_uri(model_path)
      version = Registry(root).resolve(name, ref)
  options = ServingOptions(gpu=gpu)
  if not triton_url:
    return write_model_repository(export_dir, repo_dir, serving_name, version, options)
  update = prepare_update(export_dir, repo_dir, serving_name, version, options)
  return live_update(update, triton_url)
