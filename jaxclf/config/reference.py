"""The config reference: every key of `default_config()` with its type, default, allowed values
and meaning, read from the source of the definitions themselves so that it cannot drift.

The meaning of a key is the comment block right above its assignment in defaults.py plus the
comment at the end of its line; a section's meaning is the block above `c.<section> =
ConfigDict()`. The allowed values come from validate.py's RANGES and CHOICES tables (and the
registries in names.py for names such as model.name). scripts/gen_docs.py renders it as
docs/config.md; tests/test_docs.py fails when a key has no meaning or the page is stale.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import tokenize
from typing import Any

import ml_collections

from jaxclf.config import defaults
from jaxclf.config import names
from jaxclf.config.validate import CHOICES, RANGES

ASSIGNMENT = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
  key: str
  type: str
  default: Any
  allowed: str
  meaning: str


@functools.lru_cache(maxsize=None)  # defaults.py's source does not change within a process
def source_comments() -> dict[str, str]:
  """dotted key (or section) -> its meaning, from the comments around its assignment."""
  source = inspect.getsource(defaults)
  comments: dict[int, str] = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  out, block = {}, []
  for number, line in enumerate(source.splitlines(), start=1):
    stripped = line.strip()
    if stripped.startswith("#"):
      block.append(comments.get(number, ""))
      continue
    match = ASSIGNMENT.match(line)
    if match:
      parts = block + ([comments[number]] if number in comments else [])
      out[match.group(1)] = " ".join(p for p in parts if p)
    block = []  # a comment block belongs to the line right below it
  return out


def _flatten(node: ml_collections.ConfigDict, prefix: str = ""):
  for name in node.keys():
    value, dotted = node[name], f"{prefix}{name}"
    # model.kwargs and each evals entry are one row: a record passed on whole, not separate knobs.
    atomic = dotted == "model.kwargs" or prefix == "evals."
    if isinstance(value, ml_collections.ConfigDict) and not atomic:
      yield from _flatten(value, dotted + ".")
    else:
      yield dotted, value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


# Names chosen from registries (names.py), beside validate.py's own tables.
NAMED = {"model.name": tuple(names.MODEL_ARGS), "optimizer.name": names.OPTIMIZER_NAMES,
         "schedule.name": names.SCHEDULE_NAMES}


def _allowed(key: str) -> str:
  choices = CHOICES.get(key) or NAMED.get(key)
  if choices:
    return " \\| ".join(f"`{c}`" for c in choices)
  if key in RANGES:
    lo, hi = RANGES[key]
    return f"{lo} .. {hi}" if hi is not None else f">= {lo}"
  return ""


def key_docs() -> list[KeyDoc]:
  """Every key in default_config() order."""
  meanings = source_comments()
  rows = []
  for key, value in _flatten(defaults.default_config()):
    rows.append(KeyDoc(key, type(value).__name__, value, _allowed(key), meanings.get(key, "")))
  return rows


def section_docs() -> dict[str, str]:
  """section name -> its meaning (the comment block above `c.<section> = ConfigDict()`)."""
  meanings = source_comments()
  return {k: v for k, v in meanings.items() if "." not in k and v}
