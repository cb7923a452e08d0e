"""A training run with the optional trackers around it: the orchestration layer's train call.

train_and_evaluate (the core) knows nothing of MLflow; this wraps it, mirrors each epoch's
validation metrics to MLflow through the loop's epoch_callback, and logs params, tags and
artifacts at the end. Used by `jaxclf train` and by every sweep trial.
"""
from __future__ import annotations

from typing import Any, Callable

from jaxclf.tracking import mlflow_bridge
from jaxclf.tracking.run_record import RunRecord


def train_tracked(config, workdir: str, *, tags: dict[str, str] | None = None,
                  epoch_callback: Callable[[dict], str | None] | None = None) -> dict[str, Any]:
  from jaxclf.train.loop import train_and_evaluate
  run = mlflow_bridge.start_run(config, workdir, tags)

  def on_epoch(entry: dict) -> str | None:
    if run is not None:
      run.log_epoch(entry)
    return epoch_callback(entry) if epoch_callback is not None else None

  try:
    record = train_and_evaluate(config, workdir, epoch_callback=on_epoch)
  except BaseException as e:
    if run is not None:
      run.finish(None, workdir, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
    raise
  if run is not None:
    rec = RunRecord(workdir)
    rec.update(mlflow={"run_id": run.run_id, "tracking_uri": run.uri})
    record = rec.data
    run.finish(record, workdir, "FINISHED")
  return record
