"""Optimizers by name. Weight decay never touches BatchNorm scales or biases (kernels only);
the learning rate is an injected hyperparameter so the step can scale it (plateau)."""
from __future__ import annotations

from typing import Callable

import jax
import optax

from jaxclf.config.names import OPTIMIZER_NAMES, check_table


def _kernel_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _sgd(c, lr):
  return optax.chain(optax.add_decayed_weights(c.weight_decay, _kernel_mask),
                     optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))


def _adam(c, lr):
  return optax.chain(optax.add_decayed_weights(c.weight_decay, _kernel_mask),
                     optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps))


def _adamw(c, lr):
  return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                     mask=_kernel_mask)


OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}
check_table("optimizer", OPTIMIZERS, OPTIMIZER_NAMES)


def create_optimizer(config) -> optax.GradientTransformation:
  """`learning_rate` is left injectable: the train step sets it to schedule(step) * lr_scale."""
  c = config.optimizer

  def make(learning_rate):
    tx = OPTIMIZERS[c.name](c, learning_rate)
    if c.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
    return tx

  return optax.inject_hyperparams(make)(learning_rate=c.learning_rate)
