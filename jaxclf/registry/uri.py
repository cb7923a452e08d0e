"""`resolve_model_uri`: what evaluate, serve and predict accept as a model reference.

  registry:NAME                 the production version of NAME
  registry:NAME@production      a stage (production | staging | experimental | archived | latest)
  registry:NAME@3               a version number
  registry:NAME@3?root=s3://bucket/registry    another registry root (default $JAXCLF_REGISTRY,
                                               else ./registry_store)
  /path/to/export_dir           an export directory, used as it is (its sha256s are checked)

Returns a local export directory whose files were verified against their recorded sha256 now.
"""
from __future__ import annotations

import os
import urllib.parse

from jaxclf.artifacts import ArtifactError, verify_export_dir
from jaxclf.registry.registry import Registry, RegistryError

PREFIX = "registry:"


def parse_model_uri(uri: str) -> tuple[str, str, str | None]:
  """'registry:NAME@REF?root=R' -> (NAME, REF, R or None)."""
  if not uri.startswith(PREFIX):
    raise RegistryError(f"{uri!r} is not a registry URI (registry:NAME@stage|version)")
  body = uri[len(PREFIX):]
  body, _, query = body.partition("?")
  root = urllib.parse.parse_qs(query).get("root", [None])[0] if query else None
  name, _, ref = body.partition("@")
  if not name:
    raise RegistryError(f"{uri!r}: no model name (registry:NAME@stage|version)")
  return name, ref or "production", root


def resolve_model_uri(uri: str, *, root: str | None = None) -> str:
  if not uri.startswith(PREFIX):
    if not os.path.isdir(uri):
      raise RegistryError(f"model {uri!r}: neither a registry URI (registry:NAME@stage|version) "
                          "nor an export directory")
    try:
      verify_export_dir(uri)
    except ArtifactError as e:
      raise RegistryError(str(e)) from None
    return uri
  name, ref, uri_root = parse_model_uri(uri)
  return Registry(uri_root or root).open_version(name, ref)
