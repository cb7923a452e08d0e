"""The versioned layout of metrics.json, and its validation.

The layout is documented in `metrics.schema.v1.json` beside this file (a JSON Schema, draft
2020-12, with a description on each field). `schema_version` is an integer: adding a field keeps
it, renaming or removing one bumps it and adds `metrics.schema.v<N>.json`, so an old file can
still be validated against the schema it was written with.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

SCHEMA_VERSION = 1
_DIR = os.path.dirname(os.path.abspath(__file__))


class MetricsSchemaError(ValueError):
  """metrics.json does not match its schema; the message names the field."""


def schema_path(version: int = SCHEMA_VERSION) -> str:
  return os.path.join(_DIR, f"metrics.schema.v{version}.json")


def load_schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
  path = schema_path(version)
  if not os.path.exists(path):
    raise MetricsSchemaError(f"no schema for metrics.json schema_version {version} ({path})")
  with open(path) as f:
    return json.load(f)


def validate_metrics(doc: Mapping[str, Any]) -> None:
  """Raises MetricsSchemaError naming the first offending field (as a JSON path)."""
  import jsonschema  # only the evaluator and tests need it

  version = doc.get("schema_version")
  if not isinstance(version, int):
    raise MetricsSchemaError(f"metrics.json: schema_version must be an integer, got {version!r}")
  schema = load_schema(version)
  validator = jsonschema.Draft202012Validator(schema)
  errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
  if errors:
    e = errors[0]
    where = "$" + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in e.absolute_path)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise MetricsSchemaError(f"metrics.json {where}: {e.message}{more}")


def read_metrics(path: str) -> dict[str, Any]:
  """Loads and validates a metrics.json written by any schema version this code knows."""
  with open(path) as f:
    doc = json.load(f)
  validate_metrics(doc)
  return doc
