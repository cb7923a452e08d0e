"""TrainRun: what the periodic actions and evaluators of one training run share.

The loop owns the TrainState and the LoopState; actions read and update them through this object.
With several processes the writer, the run record and the progress bar are process 0's (the
others get the silent stand-ins below); checkpoints are saved by every process (orbax
coordinates them), and evaluation metrics are reduced over all of them inside the jitted step.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax

from jaxclf.config.periodic import Every, itstime
from jaxclf.train import evaluators as evaluators_lib
from jaxclf.train.loop_state import LoopState


class Progress:
  """tqdm bar with ETA when available and enabled; plain log lines otherwise.

  The first step a process runs compiles the train step (seconds to minutes, against a fraction
  of a second for each later step), so the bar's clock starts after it: its rate and ETA are
  those of the steps that follow."""

  def __init__(self, enabled: bool, total: int, initial: int, silent: bool = False):
    self.bar, self.silent = None, silent  # silent: not process 0, prints nothing
    self.compiled = False
    if enabled and not silent:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.05)
      except ImportError:
        pass

  def update(self, n: int, **postfix):
    if self.bar is not None:
      if n and not self.compiled:
        self._restart_clock(self.bar.n + n)
      else:
        self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)
    self.compiled = self.compiled or n > 0

  def _restart_clock(self, done: int) -> None:
    """The bar at `done` steps with its clock and rate history starting now, as a bar created
    now with initial=done would be."""
    self.bar.reset(total=self.bar.total)
    self.bar.n = self.bar.last_print_n = self.bar.initial = done
    self.bar.refresh()

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    elif not self.silent:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None


class SilentWriter:
  """MetricWriter's interface, writing nothing: every process but 0."""

  def __getattr__(self, name):
    if name.startswith(("write_", "flush", "close")):
      return lambda *args, **kwargs: None
    raise AttributeError(name)


def unwritten(record):
  """A RunRecord that keeps its data in memory only (every process but 0)."""
  record.write = lambda: None
  return record


class TrainWindow:
  """Train metrics and timing since the last log: merged clu metrics, steps, data-wait seconds.

  `steps`, `wait` and the clock (`t0`) leave out the first step a process runs, which compiles:
  the images/s and data-wait share logged are the steady rate's. Its metrics are kept."""

  def __init__(self, clock: Callable[[], float] = time.time):
    self.clock, self.compiled = clock, False
    self.reset()

  def reset(self):
    self.metrics, self.latest, self.steps, self.wait, self.t0 = None, None, 0, 0.0, self.clock()

  def add(self, m, wait_s: float):
    self.metrics = m if self.metrics is None else self.metrics.merge(m)
    self.latest = m
    if not self.compiled:
      # Wait for the compiling step to finish, so that the clock starts on an idle device.
      jax.block_until_ready(m)
      self.compiled, self.t0 = True, self.clock()
      return
    self.steps, self.wait = self.steps + 1, self.wait + wait_s


@dataclasses.dataclass
class TrainRun:
  config: Any
  workdir: str
  dataset: Any
  spec: Any  # PreprocessSpec; calibration replaces it (temperature)
  state: Any  # TrainState (replicated)
  loop: LoopState
  steps_per_epoch: int
  total_steps: int  # the planned last step: num_epochs worth, or train.max_steps
  start_step: int  # where this process started (0, or the resumed step)
  train_input: Any
  eval_steps: dict  # {tta_flip: {on_device: jitted eval step}}
  data_sharding: Any
  failures: Any
  ckpt: Any
  writer: Any
  record: Any
  progress: Progress
  augment_key: Any
  epoch_callback: Callable[[dict], Any] | None = None
  evals: dict = dataclasses.field(default_factory=dict)
  window: TrainWindow = dataclasses.field(default_factory=TrainWindow)
  batches: Any = None  # the StepBatches stream (its iterator state goes into checkpoints)
  last_batch: Any = None  # the host batch of the latest step (image summaries)
  status: str = "completed"
  stop: bool = False  # set by an action (early stopping, the epoch callback): this step is the last
  finishing: bool = False  # the end-of-training evaluations are running
  best_pending: bool = False  # the selection evaluator improved: save a best checkpoint
  t_start: float = dataclasses.field(default_factory=time.time)
  _results: dict = dataclasses.field(default_factory=dict)  # (evaluator, step) -> result
  _predictions: dict = dataclasses.field(default_factory=dict)  # end phase: (split, tta) -> out

  @property
  def selection_eval(self) -> str:
    return self.config.early_stopping.metric.rsplit("_", 1)[0]  # val_accuracy -> val

  def epoch(self, step: int):
    e = step / self.steps_per_epoch
    return int(e) if e == int(e) else round(e, 3)

  def interval(self, rule: str) -> int:
    return Every.parse(rule).interval(self.steps_per_epoch, self.total_steps)

  def due(self, rule: str, step: int, *, first: bool = False, last: bool = True) -> bool:
    """The one periodic rule: `rule` says how often; `last` also fires on the run's last step
    (the planned end or an early stop); `first` on the first step this process trains."""
    return (itstime(step, self.interval(rule), self.total_steps, last=last)
            or (last and self.stop) or (first and step == self.start_step + 1))

  def predict(self, split: str, state, tta_flip: bool, with_logits: bool = False):
    """evaluate_split on `split`, or None when the dataset has no such (or an empty) split.
    At the end, results are shared between evaluators (calibration reuses the test pass)."""
    if split not in self.dataset.splits or len(self.dataset.split(split).labels) == 0:
      return None
    key = (split, tta_flip)
    if self.finishing and key in self._predictions:
      return self._predictions[key]
    out = evaluators_lib.evaluate_split(state, self.dataset.split(split), self.spec, self.config,
                                        self.eval_steps[tta_flip], self.data_sharding,
                                        self.failures, with_logits=with_logits)
    if self.finishing:
      self._predictions[key] = out
    return out

  def evaluate(self, name: str, step: int) -> dict | None:
    """Evaluator `name` at `step`, once per step; the selection evaluator's result then selects
    (history, best checkpoint, epoch callback) via jaxclf.train.actions.select."""
    if (name, step) not in self._results:
      result = self.evals[name](self, self.state, step) if name in self.evals else None
      self._results = {(name, step): result, **{k: v for k, v in self._results.items()
                                                if k[1] == step}}
      if result and name == self.selection_eval:
        from jaxclf.train.actions import select
        select(self, step, result)
    return self._results[(name, step)]
