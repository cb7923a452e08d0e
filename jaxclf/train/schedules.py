"""Learning-rate schedules by name. Each returns `lr(step)`; 'plateau' is a constant whose
multiplier the loop cuts when validation stops improving (the multiplier lives in TrainState,
so it is checkpointed and any schedule can be combined with it)."""
from __future__ import annotations

from typing import Callable

import optax

from jaxclf.config.names import SCHEDULE_NAMES, check_table


def _one_cycle(c, peak, total, spe):
  # Up from peak/25 over the warmup share, then down to peak * final_fraction: linearly, or
  # ('cos') along half-cosines, which is PyTorch's OneCycleLR (anneal_strategy='cos', its
  # default; with final_fraction 0 the end is PyTorch's peak / 25 / 1e4).
  if c.get("anneal", "linear") == "cos":
    final_div = 1e4 if c.final_fraction <= 0 else 1.0 / (25.0 * c.final_fraction)
    return optax.cosine_onecycle_schedule(max(total, 2), peak, pct_start=c.warmup_fraction,
                                          div_factor=25.0, final_div_factor=final_div)
  warm = max(int(c.warmup_fraction * total), 1)
  return optax.join_schedules(
      [optax.linear_schedule(peak / 25.0, peak, warm),
       optax.linear_schedule(peak, peak * c.final_fraction, max(total - warm, 1))], [warm])


def _warmup_cosine(c, peak, total, spe):
  warm = int(c.warmup_fraction * total)
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warm, 1), max(total, warm + 1),
                                            end_value=peak * c.final_fraction)


def _step(c, peak, total, spe):
  return optax.piecewise_constant_schedule(
      peak, {int(e * spe): c.decay_rate for e in c.step_epochs})


def _exponential(c, peak, total, spe):
  return optax.exponential_decay(peak, transition_steps=spe, decay_rate=c.decay_rate)


SCHEDULES: dict[str, Callable] = {
    "constant": lambda c, peak, total, spe: optax.constant_schedule(peak),
    "plateau": lambda c, peak, total, spe: optax.constant_schedule(peak),
    "step": _step,
    "exponential": _exponential,
    "warmup_cosine": _warmup_cosine,
    "one_cycle": _one_cycle,
}
check_table("schedule", SCHEDULES, SCHEDULE_NAMES)


def create_learning_rate_fn(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  return SCHEDULES[config.schedule.name](config.schedule, config.optimizer.learning_rate,
                                         total_steps, steps_per_epoch)
