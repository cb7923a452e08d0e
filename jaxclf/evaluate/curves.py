"""Training curves read back from a run's TensorBoard event files (no TensorFlow needed).

Each event file is read on its own with tensorboard's EventAccumulator and the scalars merged
per tag in wall-time order. Reading the directory as one stream would be wrong here: the
accumulator's orphan purge compares steps across *all* tags, so a val writer's file read after
the train writer's would delete train points. We purge per tag instead: when a tag's step goes
backwards (a run resumed from an earlier checkpoint), the points it overwrote are dropped.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import numpy as np

TRAIN_TAGS = ("train/loss", "train/accuracy", "train/learning_rate")
VAL_TAGS = ("val/loss", "val/accuracy")


@dataclasses.dataclass
class Series:
  steps: np.ndarray
  values: np.ndarray

  def at_or_before(self, step: int) -> tuple[int, float] | None:
    """The last point at or before `step` (what the run knew when it saved that checkpoint)."""
    idx = np.searchsorted(self.steps, step, side="right") - 1
    return (int(self.steps[idx]), float(self.values[idx])) if idx >= 0 else None


def find_event_files(tb_dir: str) -> list[str]:
  files = []
  for root, _, names in os.walk(tb_dir):
    files += [os.path.join(root, n) for n in names if "tfevents" in n]
  return sorted(files)


def _read_file(path: str) -> Iterable[tuple[str, float, int, float]]:
  from tensorboard.backend.event_processing import event_accumulator as ea
  acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
  try:
    acc.Reload()
  except Exception as e:  # a truncated file from a killed run must not hide the others
    raise ValueError(f"{path}: unreadable TensorBoard event file ({type(e).__name__}: {e})") from None
  for tag in acc.Tags().get("scalars", []):
    for ev in acc.Scalars(tag):
      yield tag, ev.wall_time, ev.step, ev.value


def read_scalars(tb_dir: str, tags: Iterable[str] | None = None) -> dict[str, Series]:
  """tag -> Series sorted by step, merged over every event file under `tb_dir`."""
  wanted = set(tags) if tags is not None else None
  points: dict[str, list[tuple[float, int, float]]] = {}
  for path in find_event_files(tb_dir):
    for tag, wall, step, value in _read_file(path):
      if wanted is None or tag in wanted:
        points.setdefault(tag, []).append((wall, step, value))
  out = {}
  for tag, pts in points.items():
    by_step: dict[int, float] = {}
    last = None
    for _, step, value in sorted(pts, key=lambda p: p[0]):
      if last is not None and step < last:  # resumed: later points replace the orphaned ones
        by_step = {s: v for s, v in by_step.items() if s < step}
      by_step[step] = value
      last = step
    steps = np.array(sorted(by_step), np.int64)
    out[tag] = Series(steps, np.array([by_step[s] for s in steps], np.float64))
  return out


def read_run_curves(run_dir: str) -> dict[str, Series]:
  """The standard training curves of a run (`<run>/tb`); {} when it has none."""
  tb_dir = os.path.join(run_dir, "tb")
  if not os.path.isdir(tb_dir):
    return {}
  return read_scalars(tb_dir, TRAIN_TAGS + VAL_TAGS)


def val_metrics_at(curves: dict[str, Series], step: int | None) -> dict | None:
  """Validation figures logged by training at (or just before) the evaluated step."""
  if not any(t in curves for t in VAL_TAGS):
    return None
  out: dict = {"source": "tensorboard val/* at the evaluated step", "step": None,
               "accuracy": None, "loss": None}
  for key, tag in (("accuracy", "val/accuracy"), ("loss", "val/loss")):
    series = curves.get(tag)
    if series is None or not len(series.steps):
      continue
    point = series.at_or_before(step) if step is not None else (
        int(series.steps[-1]), float(series.values[-1]))
    if point is not None:
      out["step"], out[key] = point
  return out
