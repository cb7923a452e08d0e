"""run.json: everything needed to compare and reproduce one run.

Fields: name, status (running|completed|early_stopped|failed), config (flattened hyperparameters),
dataset {name, version, counts}, model {name, params}, git {commit, dirty}, packages, hardware,
start/end (ISO UTC), duration_s, resumed_from_step, best {step, metric, value}, metrics {val, test}
(kept apart: the test split is never used for selection), and the code/config paths.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "clu", "ml-collections",
            "numpy", "pillow", "tensorboard", "jax2onnx", "onnxruntime")


def _now() -> str:
  return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_info(path: str = ".") -> dict[str, Any]:
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                            timeout=5).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=5).stdout.strip())
    return {"commit": commit or None, "dirty": dirty}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
  out = {}
  for p in PACKAGES:
    try:
      out[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      out[p] = None
  return out


def hardware() -> dict[str, Any]:
  import jax

  from jaxclf.ops import compile_cache, host_memory
  devs = jax.devices()
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "jax_backend": jax.default_backend(), "devices": [str(d) for d in devs],
          "device_kind": devs[0].device_kind if devs else None,
          "host_malloc": host_memory.status(),
          "compilation_cache": compile_cache.compilation_cache_status()}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


class RunRecord:
  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, "run.json")
    self.data: dict[str, Any] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.data = json.load(f)
    self._t0 = time.time()

  def start(self, config, dataset_summary: dict, model_info: dict, resumed_step: int | None) -> None:
    prior = self.data.get("duration_s", 0.0) or 0.0
    self._prior = prior if resumed_step else 0.0
    self.data.update({
        "name": config.name, "status": "running",
        "config": flatten(config.to_dict()), "dataset": dataset_summary, "model": model_info,
        "git": git_info(os.path.dirname(os.path.abspath(__file__))), "packages": package_versions(),
        "hardware": hardware(), "start": self.data.get("start") if resumed_step else _now(),
        "resumed_from_step": resumed_step, "metrics": self.data.get("metrics", {}) if resumed_step else {},
        "segments": (self.data.get("segments", []) if resumed_step else []) + [{"start": _now()}],
    })
    self.write()

  def update(self, **kw) -> None:
    self.data.update(kw)
    self.write()

  def finish(self, status: str, **kw) -> None:
    dur = time.time() - self._t0
    self.data["segments"][-1].update({"end": _now(), "duration_s": round(dur, 2)})
    self.data.update(status=status, end=_now(),
                     duration_s=round(getattr(self, "_prior", 0.0) + dur, 2), **kw)
    self.write()

  def write(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=2, default=str)
    os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- headline figures

SINGLE_VIEW_BASIS = ("single view (no test-time augmentation), best-by-validation checkpoint, "
                     "held-out test split: run.json metrics.test.accuracy; the model as served")


def _config_value(config: Any, dotted: str) -> Any:
  """A value from a flattened ('train.tta_flip') or nested ({'train': {'tta_flip'}}) config."""
  if not isinstance(config, dict):
    return None
  if dotted in config:
    return config[dotted]
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def accuracy_summary(metrics: dict[str, Any] | None, config: Any = None) -> dict[str, Any]:
  """The accuracy figures an export, a registry version or `jaxclf registry show|list` present.

  `test` is the single-view test accuracy (run.json metrics.test.accuracy): what the exported,
  served model does on one view of each image. A run with train.tta_flip also stores the
  flip-averaged figure as metrics.test_tta; it is returned as `test_tta`, a separate, labelled
  number, never as the model's accuracy. Runs recorded before metrics.test_tta existed evaluated
  metrics.test itself with TTA when train.tta_flip was on: that figure moves to `test_tta` and
  `test` is None (re-evaluate with `jaxclf evaluate` for the single-view accuracy).
  """
  metrics = metrics if isinstance(metrics, dict) else {}
  test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
  tta = metrics.get("test_tta") if isinstance(metrics.get("test_tta"), dict) else {}
  val = metrics.get("val") if isinstance(metrics.get("val"), dict) else {}
  tta_on = bool(_config_value(config, "train.tta_flip"))
  out: dict[str, Any] = {"test": test.get("accuracy"), "test_count": test.get("count"),
                         "test_tta": tta.get("accuracy"), "val": val.get("accuracy"),
                         "basis": SINGLE_VIEW_BASIS}
  if tta_on and not tta and test:
    out.update(test=None, test_count=None, test_tta=test.get("accuracy"),
               basis=("not recorded: this run predates single-view test metrics and its "
                      "metrics.test is a flip-TTA figure (shown as test_tta); run `jaxclf "
                      "evaluate` on the export for the single-view accuracy"))
  if out["test_tta"] is not None:
    out["test_tta_note"] = ("test-time augmentation (mean of the image and its mirror): not what "
                            "the exported model serves")
  return out
