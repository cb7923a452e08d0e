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
  devs = jax.devices()
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "jax_backend": jax.default_backend(), "devices": [str(d) for d in devs],
          "device_kind": devs[0].device_kind if devs else None}


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
