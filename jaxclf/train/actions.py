"""The periodic actions of the training loop, each a small function of (run, step) that fires on
its rule in `config.periodic` (jaxclf/config/periodic.py: '<N> steps' | '<N> epochs' | '<N>%').

Adding one: a default rule in jaxclf/config/defaults.py (`c.periodic.<name> = "2 epochs"`) and a
function here decorated with `@periodic_action("<name>")`. They run after every train step in
this file's order, and `checkpoint` always runs last, so that a saved state has every action of
its step applied (resuming then starts cleanly at the next step).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import numpy as np

from jaxclf.config.defaults import default_config
from jaxclf.config.names import check_table
from jaxclf.data import transforms


class NonFiniteError(FloatingPointError):
  pass


@dataclasses.dataclass(frozen=True)
class Action:
  fn: Callable
  first: bool = False  # also on the first step a process trains (a fresh start and each resume)
  last: bool = True  # also on the run's last step (planned end or early stop)
  when: Callable | None = None  # a trigger of its own instead of config.periodic.<name>


ACTIONS: dict[str, Action] = {}


def periodic_action(name: str, *, first: bool = False, last: bool = True, when=None):
  def register(fn):
    ACTIONS[name] = Action(fn, first, last, when)
    return fn
  return register


def run_actions(run, step: int) -> None:
  """Everything due at `step`, checkpoint last."""
  for name in sorted(ACTIONS, key=lambda n: n == "checkpoint"):
    a = ACTIONS[name]
    due = a.when(run, step) if a.when else run.due(run.config.periodic[name], step,
                                                    first=a.first, last=a.last)
    if due:
      a.fn(run, step)


def check_finite(m, step: int) -> None:
  loss = float(jax.device_get(m.loss.compute()))
  gn = float(jax.device_get(m.grad_norm.compute()))
  if not (math.isfinite(loss) and math.isfinite(gn)):
    raise NonFiniteError(f"non-finite training loss/gradient at step {step} (loss={loss}, "
                         f"grad_norm={gn}); lower optimizer.learning_rate, set "
                         "optimizer.grad_clip_norm, or check the input data")


def window_rates(w, batch_size: int) -> dict[str, float]:
  """Steps/s, images/s and the share of time spent waiting for data, over the window's timed
  steps (`TrainWindow` leaves the compiling first step out of both the steps and the clock)."""
  dt = max(w.clock() - w.t0, 1e-9)
  return {"steps_per_sec": w.steps / dt, "images_per_sec": w.steps * batch_size / dt,
          "data_wait_share": w.wait / dt}


@periodic_action("log")
def log_train_metrics(run, step: int) -> None:
  w = run.window
  if w.metrics is None:  # nothing trained since the last log (a resume at a logged step)
    return
  check_finite(w.latest, step)
  c = {k: float(v) for k, v in w.metrics.compute().items()}
  c["epoch"] = step / run.steps_per_epoch
  rates = {}
  if w.steps:  # the window's timed steps: all but a process's first, compiling one
    rates = window_rates(w, run.train_input.batch_size)
    c.update(rates)
  run.writer.write_scalars(step, {f"train/{k}": v for k, v in c.items()})
  run.progress.update(0, loss=f"{c['loss']:.3f}", acc=f"{c['accuracy']:.3f}",
                      **({"img_s": f"{rates['images_per_sec']:.0f}",
                          "wait": f"{rates['data_wait_share']:.1%}"} if rates else {}))
  run.loop.last_train = {**(run.loop.last_train or {}), **c}
  w.reset()


@periodic_action("image_summary", first=True, last=False)
def write_augmented_batch(run, step: int) -> None:
  """The batch just trained on, as the model saw it (augmentation keyed by its step)."""
  if run.last_batch is None:  # train.cache_frozen_features: the frozen phase sees no images
    return
  grid = transforms.image_grid(run.train_input.preview(run.last_batch, run.augment_key, step - 1))
  run.writer.write_images(step - 1, {"train/augmented_batch": grid})


def _any_eval_due(run, step: int) -> bool:
  return any(e.when != "end" and run.due(e.when, step) for e in run.evals.values())


@periodic_action("evaluate", when=_any_eval_due)
def run_periodic_evals(run, step: int) -> None:
  for name, e in run.evals.items():
    if e.when != "end" and run.due(e.when, step):
      run.evaluate(name, step)


# Two accuracies closer than this are the same count of correct images (1/n is above 1e-7 for
# any validation split under ten million images): only float rounding is absorbed.
_TIE = 1e-9


def is_better(val: dict, best: dict | None, metric: str, min_delta: float) -> tuple[bool, str]:
  """Whether the validation result `val` ({'loss', 'accuracy'}) replaces `best` (the LoopState's
  best: {'epoch', 'val', ...}, or None), and why, in words for the run output.

  `metric` (val_accuracy: higher is better; val_loss: lower) must improve by more than
  `min_delta`. A tie on it goes to the other one: at equal val accuracy the lower val loss wins.
  Small validation splits tie often (20 images allow 21 accuracies), and the later epoch of a
  tie is often the better fitted one: the fine-tuned epoch after a frozen probe, say."""
  maximize = metric.endswith("accuracy")
  key, other = ("accuracy", "loss") if maximize else ("loss", "accuracy")
  if best is None:
    return True, f"val {key} {val[key]:.4f}, the first validation"
  was, epoch = best["val"], best["epoch"]
  gain = val[key] - was[key] if maximize else was[key] - val[key]  # > 0: better on the metric
  if abs(gain) <= _TIE:
    other_gain = was[other] - val[other] if maximize else val[other] - was[other]
    return other_gain > 0, (f"val {key} {val[key]:.4f} ties epoch {epoch}; val {other} "
                            f"{val[other]:.4f} vs {was[other]:.4f}")
  why = f"val {key} {val[key]:.4f} vs {was[key]:.4f} at epoch {epoch}"
  if gain > min_delta:
    return True, why
  return False, why + (f", within min_delta {min_delta:g}" if gain > 0 else "")


def select(run, step: int, val: dict) -> None:
  """A selection-evaluator result: history entry, best checkpoint, run.json, epoch callback."""
  ls, es, epoch = run.loop, run.config.early_stopping, run.epoch(step)
  ls.history.append({"epoch": epoch, "step": step, "val_loss": val["loss"],
                     "val_accuracy": val["accuracy"],
                     "train_loss": (ls.last_train or {}).get("loss"), "wall_time": time.time()})
  better, why = is_better(val, ls.best, es.metric, float(es.min_delta))
  kept = f"best: this epoch ({why})" if better else f"best stays epoch {ls.best['epoch']} ({why})"
  run.progress.write(f"epoch {epoch}/{run.config.train.num_epochs} step {step}: val loss "
                     f"{val['loss']:.4f} acc {val['accuracy']:.4f} "
                     f"({time.time() - run.t_start:.0f}s); {kept}")
  if better:
    value = val["accuracy"] if es.metric.endswith("accuracy") else val["loss"]
    ls.best = {"step": step, "epoch": epoch, "metric": es.metric, "value": value, "val": val}
    run.best_pending = True
  run.record.update(metrics={"val": ls.best["val"] if ls.best else None}, history=ls.history)
  stop = run.epoch_callback(dict(ls.history[-1])) if run.epoch_callback else None
  if stop:
    run.status, run.stop = str(stop), True


@periodic_action("plateau", last=False)
def reduce_lr_on_plateau(run, step: int) -> None:
  sc, ls = run.config.schedule, run.loop
  val = run.evaluate(run.selection_eval, step) if sc.name == "plateau" else None
  if not val:
    return
  if ls.plateau_best is None or val["loss"] < ls.plateau_best:
    ls.plateau_best, ls.plateau_bad = val["loss"], 0
    return
  ls.plateau_bad += 1
  if ls.plateau_bad >= sc.plateau_patience:
    # lr_scale lives in the TrainState: the jitted step reads it, and checkpoints carry it.
    run.state = run.state.replace(lr_scale=run.state.lr_scale * sc.plateau_factor)
    ls.plateau_bad = 0
    run.writer.write_scalars(step, {"train/lr_scale": float(run.state.lr_scale)})


@periodic_action("early_stopping", last=False)
def stop_early(run, step: int) -> None:
  es, ls = run.config.early_stopping, run.loop
  val = run.evaluate(run.selection_eval, step) if es.patience else None
  if not val:
    return
  ls.bad_checks = 0 if ls.best and ls.best["step"] == step else ls.bad_checks + 1
  if ls.bad_checks >= es.patience:
    run.progress.write(f"early stopping: {es.metric} has not improved by {es.min_delta} for "
                       f"{es.patience} checks (best {ls.best['value']:.4f} at epoch "
                       f"{ls.best['epoch']})")
    run.status, run.stop = "early_stopped", True


@periodic_action("confusion_matrix")
def write_confusion_matrix(run, step: int) -> None:
  """The validation confusion matrix, rows normalised: true class down, predicted across."""
  out = run.predict("val", run.state, False, with_logits=True)
  k = run.dataset.num_classes
  cm = np.zeros((k, k))
  np.add.at(cm, (out["labels"], out["logits"].argmax(1)), 1)
  cm /= np.maximum(cm.sum(1, keepdims=True), 1)
  cells = np.kron((255 * (1 - cm)).astype(np.uint8), np.ones((16, 16), np.uint8))
  run.writer.write_images(step, {"val/confusion_matrix": cells[..., None]})


def _checkpoint_due(run, step: int) -> bool:
  return run.best_pending or run.due(run.config.periodic.checkpoint, step)


@periodic_action("checkpoint", when=_checkpoint_due)
def save_checkpoint(run, step: int) -> None:
  """The one place that saves: 'latest' on the rule (and the last step), 'best' when the
  selection evaluator improved at this step. The loop state saved is the state after `step`."""
  ls = run.loop
  ls.iter_epoch, ls.iter_state = run.batches.iterator_state()
  kinds = (["latest"] if run.due(run.config.periodic.checkpoint, step) else []) + (
      ["best"] if run.best_pending else [])
  if "latest" in kinds and run.window.metrics is not None:
    # A window of train metrics never spans a resumable state: a run resumed from this step
    # starts a new window at the next one, so the uninterrupted run closes its window here too,
    # and both log the same train loss (and history the same last_train) whatever the periods.
    log_train_metrics(run, step)
  for kind in kinds:
    run.ckpt.save(run.state, ls, best=kind == "best")
  run.best_pending = False


check_table("periodic action", set(ACTIONS) - {"evaluate"}, default_config().periodic.keys())
