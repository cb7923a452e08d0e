"""A training run with the optional MLflow run around it: what `jaxclf train` and every sweep
trial call.

train_and_evaluate (the training core) knows nothing of MLflow; train_with_tracking wraps it,
mirrors each epoch's validation metrics to MLflow through the loop's epoch_callback, and logs
params, tags and artifacts at the end. With tracking off it is train_and_evaluate itself.
The only tracking module that imports train/, and only when called, so that the run record
(run_record.py, which the trainer imports) stays below the trainer.
"""
from __future__ import annotations

from typing import Any, Callable

from jaxclf.tracking import mlflow_bridge
from jaxclf.tracking.run_record import RunRecord


def train_with_tracking(config, workdir: str, *, tags: dict[str, str] | None = None,
                        epoch_callback: Callable[[dict], str | None] | None = None
                        ) -> dict[str, Any]:
  """train_and_evaluate(config, workdir) inside an MLflow run when tracking.mlflow_uri or
  $MLFLOW_TRACKING_URI names a server -> the run record (run.json), with the MLflow run id."""
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
