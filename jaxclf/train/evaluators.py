"""Evaluators declared in the config (`config.evals`, as big_vision's `config.evals` and
big_vision/evaluators/common.py): each entry names a `type` from EVALUATORS and when it runs:

  when="1 epochs" | "500 steps" | "10%"   periodically during training (jaxclf/config/periodic.py)
  when="end"                              once after training, on the best-by-validation checkpoint

The entry named by early_stopping.metric ('val' in 'val_accuracy') is the selection evaluator:
its results pick the best checkpoint, feed early stopping and the plateau LR, and form run.json's
history. The test split is evaluated only at the end and never selects anything.
Every evaluation counts every example once: batches are padded and the padding masked out.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from jaxclf.config.names import EVALUATOR_ARGS, check_table
from jaxclf.train import distributed, inputs


def evaluate_split(state, split, spec, config, eval_steps, data_sharding, failures=None,
                   with_logits: bool = False) -> dict:
  """Loss and accuracy of `state` on every example of `split` (padding masked out).
  `eval_steps`: {on_device: jitted eval step} for uint8 (device) or preprocessed (host) batches.
  With several processes each feeds its rows of every batch; the step's metrics and logits come
  back replicated, so they are reduced over all processes."""
  bs = int(config.train.eval_batch_size)
  n_dev = data_sharding.mesh.size
  bs = max(n_dev, bs - bs % n_dev)
  on_device = inputs.use_device_path(config.data.on_device, split, spec, None)
  total, logits, labels = None, [], []
  for batch in inputs.eval_batches(split, spec, bs, on_device=on_device,
                                   max_pixels=int(config.data.max_pixels),
                                   read_threads=int(config.data.read_threads), failures=failures):
    m, out = eval_steps[on_device](
        state, distributed.assemble(distributed.local_part(batch), data_sharding))
    total = m if total is None else total.merge(m)
    if with_logits:
      keep = batch["label"] >= 0
      logits.append(np.asarray(out)[keep])
      labels.append(batch["label"][keep])
  if total is None:
    return {}
  c = total.compute()
  result = {"loss": float(c["loss"]), "accuracy": float(c["accuracy"]),
            "count": int(jax.device_get(total.accuracy.count))}
  if with_logits:
    result["logits"], result["labels"] = np.concatenate(logits), np.concatenate(labels)
  return result


@dataclasses.dataclass
class Classification:
  """Loss, accuracy and count on one split; `tta_flip` averages with the mirrored image."""
  name: str
  split: str
  when: str
  tta_flip: bool = False
  run_json_key = "metrics"  # run.json metrics.<name>

  def __call__(self, run, state, step: int) -> dict | None:
    out = run.predict(self.split, state, self.tta_flip, with_logits=run.finishing)
    if out is None:
      return None
    result = {k: v for k, v in out.items() if k not in ("logits", "labels")}
    if self.tta_flip:
      result["note"] = ("flip TTA (mean of the image and its mirror); the exported model serves a "
                        "single view: see metrics.test")
    run.writer.write_scalars(step, {f"{self.name}/loss": result["loss"],
                                    f"{self.name}/accuracy": result["accuracy"]})
    return result


@dataclasses.dataclass
class Calibration:
  """Fits a softmax temperature on `split`, reports ECE on `report_split` before/after, and stores
  the temperature in preprocessing.json (the export bakes it in: served confidences are
  calibrated). run.json: calibration."""
  name: str
  when: str
  split: str = "val"
  report_split: str = "test"
  run_json_key = "calibration"

  def __call__(self, run, state, step: int) -> dict | None:
    from jaxclf import calibration as calib  # numpy + scipy only
    fit = run.predict(self.split, state, False, with_logits=True)
    if fit is None:
      return None
    record = calib.calibrate(fit["logits"], fit["labels"])
    run.spec = dataclasses.replace(run.spec, temperature=float(record["temperature"]))
    with open(os.path.join(run.workdir, "preprocessing.json"), "w") as f:
      f.write(run.spec.to_json())
    report = run.predict(self.report_split, state, False, with_logits=True)
    if report is not None:
      record[f"{self.report_split}_ece_before"] = calib.ece(report["logits"], report["labels"])
      record[f"{self.report_split}_ece_after"] = calib.ece(report["logits"], report["labels"],
                                                          run.spec.temperature)
    return record


EVALUATORS: dict[str, Callable[..., Any]] = {"classification": Classification,
                                             "calibration": Calibration}
check_table("evaluator", EVALUATORS, EVALUATOR_ARGS)


def create_evaluators(config) -> dict[str, Any]:
  """The enabled `config.evals` entries, by name, in config order (validated already)."""
  out = {}
  for name, entry in config.evals.items():
    kw = {k: v for k, v in entry.items() if k not in ("type", "enabled")}
    if entry.get("enabled", True):
      out[name] = EVALUATORS[entry["type"]](name=name, **kw)
  return out
