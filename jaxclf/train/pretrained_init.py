"""model.pretrained at the start of a run: the weights a fresh TrainState starts from, and what
run.json records about them.

  'imagenet' / a catalogue name   jaxclf/models/pretrained.py (the package's file, sha256-checked)
  a `.npz` (`jaxclf weights convert`)  jaxclf/models/weights.py
  a run directory                 that run's best checkpoint (here: the training side reads runs,
                                  so the models package never imports the trainer)

`model.pretrained_sha256` pins the file (a mismatch is one error naming the file, the expected and
the actual hash); an unpinned file's hash is logged. The provenance (path, sha256, pinned, what was
loaded, whether the head was replaced) goes to run.json under model.pretrained.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxclf.hashing import sha256_file
from jaxclf.models import param_groups
from jaxclf.models.state_dict import PretrainedError, fill_variables

log = logging.getLogger("jaxclf.train")


def head_modules(model_name: str, params) -> tuple[tuple[str, ...], ...]:
  """The model's head modules (param_groups), in name order: the last one is the classifier for
  the built-ins (Dense_0 .. Dense_n, or 'classifier')."""
  names = sorted({k for k in params if param_groups.group_of(model_name, (k,)) == "head"},
                 key=lambda n: (len(n), n))
  return tuple((n,) for n in names)


def load_run(run_dir: str, model_name: str, variables: Mapping[str, Any],
             class_names) -> dict[str, Any]:
  """Another run's best checkpoint; its head is kept only when it was trained on the same
  classes (same names, same order), otherwise this model's fresh head stays."""
  from jaxclf.train.checkpoints import load_inference
  try:
    other = load_inference(run_dir, "best")
  except FileNotFoundError as e:
    raise PretrainedError(f"model.pretrained={run_dir}: {e}") from None
  heads = head_modules(model_name, variables["params"])
  load_head = tuple(other.spec.class_names) == tuple(class_names)
  hint = (f" (that run trained model {other.config.model.name!r} "
          f"{dict(other.config.model.get('kwargs', {}))}; this run's is {model_name!r})")
  return fill_variables(variables, traverse_util.flatten_dict(dict(other.variables)),
                        len(class_names), load_head, run_dir, hint, head=heads)


def weights_file(spec: str, model) -> str | None:
  """The file behind model.pretrained, or None for a run directory."""
  from jaxclf.models import pretrained
  if os.path.isdir(spec):
    return None
  if spec == "imagenet":
    return pretrained.pretrained_weights_path(pretrained.pretrained_for_model(model))
  if spec in pretrained.PRETRAINED:
    return pretrained.pretrained_weights_path(spec)
  if not os.path.isfile(spec):
    raise PretrainedError(f"model.pretrained={spec!r}: no such file or run directory (give "
                          f"'imagenet', {', '.join(pretrained.pretrained_names())}, a .npz from "
                          "`jaxclf weights convert`, or a run directory)")
  return spec


def check_pin(path: str | None, spec: str, pin: str) -> str | None:
  """The file's sha256, checked against model.pretrained_sha256 when set."""
  if path is None:
    if pin:
      raise PretrainedError(f"model.pretrained_sha256 pins a file, but model.pretrained={spec} "
                            "is a run directory")
    return None
  digest = sha256_file(path)
  if pin and digest != pin.strip().lower():
    raise PretrainedError(f"{path}: sha256 {digest} does not match model.pretrained_sha256 "
                          f"{pin.strip().lower()} (a different or corrupt file)")
  if not pin:
    log.info("model.pretrained %s: sha256 %s (not pinned; set model.pretrained_sha256 to pin "
             "it)", path, digest)
  return digest


def load_pretrained_variables(config, model, variables: Mapping[str, Any],
                              class_names) -> tuple[dict[str, Any], dict[str, Any]]:
  """-> (variables with the pretrained weights, the provenance record for run.json)."""
  spec, pin = str(config.model.pretrained), str(config.model.get("pretrained_sha256", ""))
  path = weights_file(spec, model)
  digest = check_pin(path, spec, pin)
  if path is None:
    out = load_run(spec, config.model.name, variables, class_names)
    kind = "run"
  else:
    from jaxclf.models.pretrained import load_pretrained
    out = load_pretrained(spec, model, variables, len(class_names))
    kind = "converted" if spec.endswith(".npz") else "catalogue"
  return out, provenance(spec, kind, path, digest, bool(pin), config.model.name, variables, out)


def provenance(spec, kind, path, digest, pinned, model_name, before, after) -> dict[str, Any]:
  """What was loaded: arrays that differ from the fresh initialisation, and whether the head was
  replaced (kept fresh) or taken from the source."""
  flat_b = traverse_util.flatten_dict(dict(jax.device_get(before)))
  flat_a = traverse_util.flatten_dict(dict(jax.device_get(after)))
  heads = {h[0] for h in head_modules(model_name, before["params"])}
  loaded = [p for p in flat_a if p[0] in ("params", "batch_stats")
            and not np.array_equal(np.asarray(flat_a[p]), np.asarray(flat_b[p]))]
  head_loaded = any(p[1] in heads for p in loaded)
  record = {"source": spec, "kind": kind, "path": path, "sha256": digest, "pinned": pinned,
            "arrays_loaded": len(loaded),
            "values_loaded": int(sum(np.size(flat_a[p]) for p in loaded)),
            "head": "loaded" if head_loaded else "replaced (fresh)",
            "head_modules": sorted(heads)}
  if kind == "converted":
    from jaxclf.models.weights import pretrained_provenance
    record.update({k: v for k, v in (pretrained_provenance(spec) or {}).items()
                   if k not in record})
  return record
