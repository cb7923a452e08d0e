"""CSV / JSONL label manifests: one image per row, `uri,label[,split]`.

`uri` is a local path (relative paths are resolved against the manifest's own location), an
s3:// or an http(s):// URL. CSV may have a header naming the columns (uri|path|url|file|
filename|image, label|class|category, split); without one, columns are uri,label[,split].
JSONL rows are objects with the same keys. A bad row is a DataError naming the line.
"""
from __future__ import annotations

import csv
import io
import json

from jaxclf.data.types import DataError
from jaxclf.data.sources import remote

URI_KEYS = ("uri", "path", "url", "file", "filename", "image", "image_path")
LABEL_KEYS = ("label", "class", "category", "class_name")
SPLIT_KEYS = ("split", "subset")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def is_manifest(uri: str) -> bool:
  return uri.split("?", 1)[0].lower().endswith((".csv", ".tsv", ".jsonl", ".ndjson"))


def _pick(row: dict, keys: tuple[str, ...]) -> str | None:
  lowered = {str(k).strip().lower(): v for k, v in row.items()}
  for k in keys:
    if k in lowered and lowered[k] not in (None, ""):
      return str(lowered[k]).strip()
  return None


def _rows_csv(text: str, delimiter: str):
  reader = csv.reader(io.StringIO(text), delimiter=delimiter)
  rows = [(i + 1, r) for i, r in enumerate(reader) if r and any(c.strip() for c in r)]
  if not rows:
    return
  header = [c.strip().lower() for c in rows[0][1]]
  if any(h in URI_KEYS for h in header) and any(h in LABEL_KEYS for h in header):
    for line, r in rows[1:]:
      yield line, dict(zip(header, r))
  else:
    for line, r in rows:
      yield line, dict(zip(("uri", "label", "split"), r))


def _rows_jsonl(text: str, where: str):
  for i, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}:{i + 1}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}:{i + 1}: expected a JSON object with uri and label")
    yield i + 1, obj


def read_rows(manifest_uri: str, text: str) -> list[tuple[str, str, str | None]]:
  """-> [(resolved uri, label, split or None)]"""
  lower = manifest_uri.split("?", 1)[0].lower()
  if lower.endswith((".jsonl", ".ndjson")):
    rows = _rows_jsonl(text, manifest_uri)
  else:
    rows = _rows_csv(text, "\t" if lower.endswith(".tsv") else ",")
  out = []
  for line, row in rows:
    uri, label = _pick(row, URI_KEYS), _pick(row, LABEL_KEYS)
    if not uri:
      raise DataError(f"{manifest_uri}:{line}: no uri (expected one of the columns {list(URI_KEYS)})")
    if label is None:
      raise DataError(f"{manifest_uri}:{line}: no label for {uri!r} (expected a column named "
                      f"{' or '.join(LABEL_KEYS[:2])})")
    split = _pick(row, SPLIT_KEYS)
    if split is not None:
      if split.lower() not in SPLIT_ALIASES:
        raise DataError(f"{manifest_uri}:{line}: unknown split {split!r}; use train, val or test")
      split = SPLIT_ALIASES[split.lower()]
    out.append((remote.join(manifest_uri, uri), label, split))
  if not out:
    raise DataError(f"{manifest_uri}: no rows")
  return out


def sorted_labels(labels) -> list[str]:
  """Class order: numeric when every label is an integer ('2' before '10'), else by name."""
  labels = set(labels)
  if all(l.lstrip("-").isdigit() for l in labels):
    return sorted(labels, key=int)
  return sorted(labels)
