"""Keeps a Triton model repository serving a registry stage (production by default).

`sync_serving` writes the stage's current version into the repository (jaxclf.export.triton
rewrites the version directories and configs) and, given the URL of a server running in explicit
model-control mode, switches it live (`triton.live_update`): requests in flight finish on the old
version, the next ones get the new one. A server started in poll mode picks the change up by
itself (--repository-poll-secs).
"""
from __future__ import annotations

from typing import Any

from jaxclf.registry import Registry


def sync_serving(registry: Registry, name: str, repo_dir: str, *, stage: str = "production",
                 triton_url: str | None = None, serving_name: str | None = None,
                 gpu: bool = True) -> dict[str, Any]:
  from jaxclf.export import triton
  version = registry.resolve(name, stage)
  export_dir = registry.open_version(name, version)  # sha256-verified
  options = triton.ServingOptions(gpu=gpu)
  if not triton_url:
    return triton.write_model_repository(export_dir, repo_dir, serving_name or name, version,
                                         options)
  update = triton.prepare_update(export_dir, repo_dir, serving_name or name, version, options)
  return triton.live_update(update, triton_url)
