"""Weight averaging (train.ema): an exponential moving average of the params and the BatchNorm
statistics, kept in the TrainState (`state.ema`), updated inside the jitted train step after the
optimizer's update, saved in every checkpoint, and used by everything that runs the trained
model: the evaluators (so checkpoint selection, early stopping, the test figures and
calibration), `load_inference` (so `jaxclf evaluate`, export and the registry). One function,
`inference_variables`, decides which weights those are, so no path can pick the other ones.

The average after training step t (t = 1, 2, ...; updated when t is a multiple of `every`):

  d_t   = min(decay, (1 + t) / (10 + t))   with the warm-up ramp (TensorFlow's
                                             ExponentialMovingAverage num_updates); else decay
  ema_t = d_t**every * ema_{t-every} + (1 - d_t**every) * weights_t

`decay` is per training step: updating every K steps multiplies by decay**K, so K changes the
cost, not the horizon (about 1 / (1 - decay) steps). The ramp keeps the average from being
mostly the initial weights in a short run (d_t < decay for t < (10 * decay - 1) / (1 - decay)).
The average starts from the initial (or pretrained, or restored) weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EmaSettings:
  decay: float = 0.0  # 0 = off
  warmup: bool = True
  every: int = 1

  @classmethod
  def from_config(cls, config) -> "EmaSettings":
    """config.train.ema; a run directory's config.json from before weight averaging has none:
    off."""
    section: Mapping[str, Any] | None = config.train.get("ema") if "train" in config else None
    if not section:
      return cls()
    return cls(float(section.get("decay", 0.0)), bool(section.get("warmup", True)),
               int(section.get("every", 1)))

  @property
  def enabled(self) -> bool:
    return self.decay > 0


def start(state):
  """The state with its average restarted from its own params and BatchNorm statistics (fresh
  copies: the train step donates the state, and one buffer cannot be donated twice)."""
  return state.replace(ema=jax.tree.map(jnp.copy, {"params": state.params,
                                                   "batch_stats": state.batch_stats}))


def decay_at(step, settings: EmaSettings):
  """The factor on the old average at training step `step` (an update step): d_t**every."""
  d = jnp.float32(settings.decay)
  if settings.warmup:
    t = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
  return d ** settings.every


def update(state, settings: EmaSettings):
  """The state (after its optimizer update, `state.step` already counting it) with its average
  moved towards its params and BatchNorm statistics when the step is due; traced in the step."""
  due = state.step % settings.every == 0
  d = jnp.where(due, decay_at(state.step, settings), 1.0)

  def mix(avg, new):
    if not jnp.issubdtype(avg.dtype, jnp.floating):  # a counter, if a model keeps one
      return jnp.where(due, new, avg)
    # avg + (1 - d) (new - avg), the same average as d avg + (1 - d) new, written so that a
    # weight that never changes (a frozen layer: the whitening stem, a frozen backbone) keeps its
    # exact value in the average rather than drifting by an ulp per update.
    a = avg.astype(jnp.float32)
    return (a + (1.0 - d) * (new.astype(jnp.float32) - a)).astype(avg.dtype)

  current = {"params": state.params, "batch_stats": state.batch_stats}
  return state.replace(ema=jax.tree.map(mix, state.ema, current))


def inference_variables(state) -> dict:
  """{'params', 'batch_stats'} that evaluation, calibration, checkpoint selection, evaluate and
  export run: the average when train.ema is on (the state holds one), else the trained weights."""
  if getattr(state, "ema", None) is not None:
    return {"params": state.ema["params"], "batch_stats": state.ema["batch_stats"]}
  return {"params": state.params, "batch_stats": state.batch_stats}


def weights_kind(state) -> str:
  """What inference_variables(state) returns, in run.json's and export.json's words."""
  return "ema" if getattr(state, "ema", None) is not None else "trained"
