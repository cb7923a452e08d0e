"""The export directory as a file format, apart from the code that makes one.

Export (jaxclf.export.onnx) writes these directories; the registry stores them, evaluation and
serving load them. All of them agree on the file names below and on one integrity check, so the
format lives here, in a foundation module (stdlib only: the serving image and the Triton python
backend import it without jax or onnx), and the registry never imports the exporter.

  model.onnx, preprocessing.json, labels.txt, export.json (+ reference_stats.json, optional;
  + model_raw.onnx: the same graph behind a normalisation node, raw 0-255 pixels in, for Triton's
  standard image interface; exports made before it existed lack it)
  export.json: {"format": "jaxclf-export", "artifacts": {file: sha256}, ...}, written last.
"""
from __future__ import annotations

import json
import os
from typing import Any

from jaxclf.hashing import sha256_file

EXPORT_FORMAT = "jaxclf-export"
MODEL_FILE, SPEC_FILE, LABELS_FILE = "model.onnx", "preprocessing.json", "labels.txt"
EXPORT_FILE, REFERENCE_FILE = "export.json", "reference_stats.json"
RAW_MODEL_FILE = "model_raw.onnx"
REQUIRED_FILES = (MODEL_FILE, SPEC_FILE, LABELS_FILE, EXPORT_FILE)


class ArtifactError(RuntimeError):
  """A directory that is not a complete, unaltered export (names the first bad file)."""


def verify_export_dir(export_dir: str) -> dict[str, Any]:
  """Reads export.json and checks every listed artefact's sha256; returns export.json's content.
  Raises ArtifactError naming the first file that is missing or altered."""
  missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(export_dir, f))]
  if missing:
    raise ArtifactError(f"{export_dir} is not a jaxclf export: missing {', '.join(missing)} "
                        "(make one with `jaxclf export --run RUN --out DIR`)")
  with open(os.path.join(export_dir, EXPORT_FILE)) as f:
    meta = json.load(f)
  if meta.get("format") != EXPORT_FORMAT:
    raise ArtifactError(f"{export_dir}/{EXPORT_FILE}: format {meta.get('format')!r} is not "
                        f"{EXPORT_FORMAT!r}")
  for fn, want in meta.get("artifacts", {}).items():
    path = os.path.join(export_dir, fn)
    if not os.path.isfile(path):
      raise ArtifactError(f"{path}: listed in {EXPORT_FILE} but missing")
    got = sha256_file(path)
    if got != want:
      raise ArtifactError(f"{path}: sha256 {got[:16]}… does not match {EXPORT_FILE} "
                          f"({want[:16]}…); the file changed after export")
  return meta
