"""One trial: parameters from the study, an ordinary run in its own directory, the val metric back.

Only validation numbers reach Optuna: trial.report() gets each epoch's val metric through the
training loop's epoch_callback, and the objective returns the best val metric. Test metrics stay in
the trial's run.json, which the sampler and the pruner never read.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any

import optuna

from jaxclf.sweeps import space as spaces
from jaxclf.sweeps.study import HEARTBEAT_S, original_number, trial_dir


class Heartbeat:
  """Touches <trial dir>/heartbeat every HEARTBEAT_S seconds while the trial runs."""

  def __init__(self, path: str):
    self.path, self._stop = path, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while True:
      with open(self.path, "a"):
        os.utime(self.path)
      if self._stop.wait(HEARTBEAT_S):
        return

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _pruning_callback(trial: optuna.Trial, metric: str, num_epochs: int):
  def on_epoch(entry: dict[str, Any]) -> str | None:
    value = entry.get(metric)  # e.g. val_accuracy: the history entry carries no test numbers
    if value is None or not math.isfinite(value):
      return None
    trial.report(float(value), step=int(entry["epoch"]))
    trial.set_user_attr("last_epoch", {k: v for k, v in entry.items() if k != "wall_time"})
    # After the last epoch there is nothing left to save: a trial that trained to the end is
    # COMPLETE, whatever the pruner would say (ASHA otherwise marks finished trials pruned).
    if int(entry["epoch"]) >= num_epochs:
      return None
    return "pruned" if trial.should_prune() else None
  return on_epoch


class Objective:
  """Callable for study.optimize: trains one trial and returns its best val metric."""

  def __init__(self, base_config, sweep: dict[str, Any], workdir: str, sweep_name: str,
               thread_overrides: dict[str, Any] | None = None):
    self.base = spaces.apply_overrides(base_config, sweep["set"], "sweep 'set'")
    self.sweep, self.workdir, self.sweep_name = sweep, workdir, sweep_name
    self.threads = dict(thread_overrides or {})

  def __call__(self, trial: optuna.Trial) -> float:
    try:
      record = self._train(trial)
    except KeyboardInterrupt:
      trial.set_user_attr("interrupted", True)  # `jaxclf sweep --resume` continues this one
      trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
      raise
    except Exception as e:  # a crash or a NaN: recorded, and the sweep goes on
      trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
      raise
    metric = self.sweep["metric"]
    val = (record.get("metrics") or {}).get("val") or {}
    key = metric.split("_", 1)[1]  # accuracy | loss
    if record.get("status") == "pruned":
      raise optuna.TrialPruned(f"pruned at epoch {len(record.get('history') or [])}: "
                               f"{metric} {val.get(key)}")
    if val.get(key) is None:
      raise RuntimeError(f"trial {trial.number}: the run recorded no validation {key}")
    return float(val[key])

  def _train(self, trial: optuna.Trial) -> dict[str, Any]:
    # jax loads in the worker, not the parent
    from jaxclf.tracking.tracked_run import train_with_tracking
    params = spaces.suggest(trial, self.sweep)
    run_dir = trial_dir(self.workdir, trial)
    os.makedirs(run_dir, exist_ok=True)
    trial.set_user_attr("run_dir", os.path.relpath(run_dir, self.workdir))
    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    config = spaces.apply_overrides(self.base, {**params, **self.threads},
                                    f"trial {trial.number}")
    number = original_number(trial)
    with open(os.path.join(run_dir, "trial.json"), "a") as f:  # one line per attempt
      f.write(json.dumps({"number": number, "optuna_number": trial.number, "params": params,
                          "sweep": self.sweep_name, "worker": trial.user_attrs.get("worker")},
                         default=list) + "\n")
    with Heartbeat(os.path.join(run_dir, "heartbeat")):
      return train_with_tracking(config, run_dir,
                                 tags={"sweep": self.sweep_name, "trial": str(number)},
                                 epoch_callback=_pruning_callback(
                                     trial, self.sweep["metric"], int(config.train.num_epochs)))
