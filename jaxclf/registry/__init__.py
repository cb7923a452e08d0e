"""Model registry: immutable numbered versions of export directories, stages with an audit log,
sha256 verification on every load, and the link to what Triton serves.

  Registry(root).register(export_dir, name) -> ModelVersion (stage experimental)
  .list_versions(name) / .show(name, ref) / .promote(name, ref, stage, reason) / .rollback(name)
  .open_version(name, ref) -> verified local export dir
  resolve_model_uri("registry:NAME@stage|version") -> verified local export dir
  (serving a stage through Triton, and the promotion gate: jaxclf.deploy, the layer above)
"""
from jaxclf.registry.registry import (STAGES, IntegrityError, ModelVersion, Registry,
                                      RegistryError, default_root)
from jaxclf.registry.uri import parse_model_uri, resolve_model_uri

__all__ = ["STAGES", "IntegrityError", "ModelVersion", "Registry", "RegistryError", "default_root",
           "parse_model_uri", "resolve_model_uri"]
