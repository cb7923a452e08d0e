"""Grid and random sweeps, and comparing runs.

A config file defines `get_sweep(name)` beside `get_config(arg)` (big_vision style):
  {"grid": {"optimizer.learning_rate": [0.05, 0.1], ...}}                      every combination
  {"random": {"key": ("log_uniform", lo, hi) | ("uniform", lo, hi) | ("choice", [..])},
   "trials": N, "seed": S}                                                     N seeded draws
Each trial is an ordinary run in <workdir>/<trial-name>/ (so each resumes, and each has its own
run.json); `jaxclf runs compare DIR...` tabulates run.json records side by side.

  jaxclf sweep --config configs/cnn.py --sweep lr_grid --workdir runs/sweep
  jaxclf runs compare runs/sweep/*  [--sort test_accuracy] [--json]
"""
from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import math
import os
import sys
from typing import Any

import numpy as np


def expand_sweep(spec: dict[str, Any]) -> list[dict[str, Any]]:
  """Sweep spec -> list of {dotted key: value} overrides."""
  if "grid" in spec:
    keys = list(spec["grid"])
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec["grid"][k] for k in keys))]
  if "random" in spec:
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    trials = []
    for _ in range(int(spec.get("trials", 8))):
      t = {}
      for key, dist in spec["random"].items():
        kind = dist[0]
        if kind == "log_uniform":
          t[key] = float(math.exp(rng.uniform(math.log(dist[1]), math.log(dist[2]))))
        elif kind == "uniform":
          t[key] = float(rng.uniform(dist[1], dist[2]))
        elif kind == "choice":
          t[key] = dist[1][int(rng.integers(len(dist[1])))]
        else:
          raise ValueError(f"sweep key {key!r}: unknown distribution {kind!r}")
      trials.append(t)
    return trials
  raise ValueError("a sweep spec needs 'grid' or 'random'")


def trial_name(overrides: dict[str, Any]) -> str:
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  return ",".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in overrides.items()).replace("/", "_")


def load_sweep(config_path: str, name: str) -> dict[str, Any]:
  path = config_path.partition(":")[0]
  spec = importlib.util.spec_from_file_location("_jaxclf_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(name)")
  return module.get_sweep(name)


def run_sweep(config_spec: str, sweep: str, workdir: str, extra=()) -> list[dict[str, Any]]:
  from jaxclf.config import load_config
  from jaxclf.train.loop import train_and_evaluate
  trials = expand_sweep(load_sweep(config_spec, sweep))
  results = []
  for i, overrides in enumerate(trials):
    items = [f"{k}={v}" for k, v in overrides.items()] + list(extra)
    config = load_config(config_spec, items)
    run_dir = os.path.join(workdir, f"{i:03d}_{trial_name(overrides)}")
    print(f"[sweep {i + 1}/{len(trials)}] {run_dir}", flush=True)
    record = train_and_evaluate(config, run_dir)
    results.append(summarize(record, run_dir))
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump({"config": config_spec, "sweep": sweep, "trials": results}, f, indent=2)
  return results


def summarize(record: dict[str, Any], run_dir: str) -> dict[str, Any]:
  m = record.get("metrics") or {}
  return {"run": run_dir, "name": record.get("name"), "status": record.get("status"),
          "model": (record.get("model") or {}).get("name"),
          "dataset_version": (record.get("dataset") or {}).get("version"),
          "val_accuracy": (m.get("val") or {}).get("accuracy"),
          "test_accuracy": (m.get("test") or {}).get("accuracy"),
          "duration_s": record.get("duration_s"), "git": (record.get("git") or {}).get("commit"),
          "hparams": {k: v for k, v in (record.get("config") or {}).items()
                      if k.split(".")[0] in ("optimizer", "schedule", "train", "model")}}


def compare_runs(paths: list[str], sort: str = "val_accuracy") -> list[dict[str, Any]]:
  rows = []
  for p in paths:
    f = os.path.join(p, "run.json")
    if os.path.isfile(f):
      with open(f) as fh:
        rows.append(summarize(json.load(fh), p))
  rows.sort(key=lambda r: -(r.get(sort) or -1e9) if "accuracy" in sort else (r.get(sort) or 0))
  return rows


def _print_table(rows):
  if not rows:
    print("no runs found (directories with run.json)")
    return
  # Only hyperparameters that differ between runs are shown: that is what a comparison is for.
  keys = sorted({k for r in rows for k in r["hparams"]})
  differing = [k for k in keys if len({json.dumps(r["hparams"].get(k)) for r in rows}) > 1]
  head = ["run", "status", "val_acc", "test_acc", "time_s", "data_ver"] + differing
  table = [[os.path.basename(r["run"].rstrip("/")), r["status"],
            f"{r['val_accuracy']:.4f}" if r["val_accuracy"] is not None else "-",
            f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-",
            f"{r['duration_s']:.0f}" if r["duration_s"] else "-", (r["dataset_version"] or "-")[:8]]
           + [str(r["hparams"].get(k)) for k in differing] for r in rows]
  widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
  for line in [head] + table:
    print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def add_sweep_commands(sub) -> None:
  s = sub.add_parser("sweep", help="run a grid or random sweep defined in a config file")
  s.add_argument("--config", required=True)
  s.add_argument("--sweep", required=True, help="name passed to the config's get_sweep()")
  s.add_argument("--workdir", required=True)
  s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  s.set_defaults(func=lambda a: (_print_table(run_sweep(a.config, a.sweep, a.workdir, a.set)), 0)[1])
  r = sub.add_parser("runs", help="list and compare runs")
  rs = r.add_subparsers(dest="runs_command", required=True)
  c = rs.add_parser("compare", help="tabulate run.json records side by side")
  c.add_argument("paths", nargs="+")
  c.add_argument("--sort", default="val_accuracy")
  c.add_argument("--json", action="store_true")

  def _compare(a):
    paths = [q for p in a.paths for q in (glob.glob(p) or [p])]
    rows = compare_runs(paths, a.sort)
    if a.json:
      json.dump(rows, sys.stdout, indent=2)
      print()
    else:
      _print_table(rows)
    return 0
  c.set_defaults(func=_compare)
