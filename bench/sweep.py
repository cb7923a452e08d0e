"""Sweep throughput: `jaxclf sweep --parallel 2` against `--parallel 1` on the same 4 trials,
both measured in this one run, and their ratio.

  .venv/bin/python bench/sweep.py [--trials 4] [--config configs/cnn.py:tiny] [--out docs/results/sweep.json]

Both legs run the same random search (same seed, so the same 4 parameter draws for --parallel 1;
--parallel 2 seeds each worker apart, so the draws differ but the trial shape does not: the
architecture and data are fixed, only learning rate / weight decay vary). The figure is the wall
time for the whole sweep (process start, compilation, training, evaluation) and the trials per
minute; ratio = parallel-1 wall / parallel-2 wall (> 1: two workers finish the budget sooner).
Run it on a quiet machine: other load on the cores changes both legs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
import importlib.util
spec = importlib.util.spec_from_file_location("c", {config!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)

def get_config(arg=None):
  return m.get_config({arg!r})

def get_sweep(name):
  return {{"sampler": "random", "trials": {trials}, "seed": 0, "pruner": "none",
           "set": {{"train.num_epochs": {epochs}}},
           "space": {{"optimizer.learning_rate": {{"float": (0.02, 0.2), "log": True}},
                     "optimizer.weight_decay": {{"float": (1e-5, 1e-3), "log": True}}}}}}
'''


def run_leg(config_file: str, parallel: int, workdir: str) -> dict:
  t0 = time.time()
  out = subprocess.run([sys.executable, "-m", "jaxclf.cli", "sweep", "--config", config_file,
                        "--sweep", "bench", "--workdir", workdir, "--parallel", str(parallel)],
                       cwd=ROOT, capture_output=True, text=True)
  wall = time.time() - t0
  if out.returncode != 0:
    raise SystemExit(f"--parallel {parallel} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {"parallel": parallel, "wall_s": round(wall, 1), "counts": summary["counts"],
          "trial_compute_s": summary["compute_s"],
          "trials_per_min": round(60 * sum(summary["counts"].values()) / wall, 2),
          "best_val_accuracy": (summary["best"] or {}).get("val_accuracy")}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/cnn.py:tiny", help="path.py[:arg] of the base config")
  p.add_argument("--trials", type=int, default=4)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--out", default="docs/results/sweep.json")
  a = p.parse_args()
  path, _, arg = a.config.partition(":")
  with tempfile.TemporaryDirectory(prefix="jaxclf-bench-sweep-") as tmp:
    config_file = os.path.join(tmp, "bench_sweep.py")
    with open(config_file, "w") as f:
      f.write(CONFIG.format(config=os.path.abspath(os.path.join(ROOT, path)), arg=arg or None,
                            trials=a.trials, epochs=a.epochs))
    baseline = run_leg(config_file, 1, os.path.join(tmp, "p1"))
    candidate = run_leg(config_file, 2, os.path.join(tmp, "p2"))
  emit({"bench": "sweep", "config": a.config, "trials": a.trials, "epochs": a.epochs,
        "cpu_count": os.cpu_count(), "baseline": baseline, "parallel_2": candidate,
        "ratio_wall_p1_over_p2": round(baseline["wall_s"] / candidate["wall_s"], 3),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, a.out)


if __name__ == "__main__":
  main()
