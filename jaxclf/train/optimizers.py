"""Optimizers by name. Weight decay never touches BatchNorm scales or biases (kernels only);
the learning rate is an injected hyperparameter so the step can scale it (plateau)."""
from __future__ import annotations

from typing import Callable

import jax
import optax

from jaxclf.config.names import OPTIMIZER_NAMES, check_table, parse_lr_mults
from jaxclf.models import param_groups


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


def scale_by_layer_decay(model_name: str, decay: float) -> optax.GradientTransformation:
  """Layer-wise learning-rate decay: each leaf's update times decay ** (levels below the head)
  (param_groups.layer_levels: the stem is the deepest level down, the head gets 1)."""
  def update(updates, state, params=None):
    levels, head = param_groups.layer_levels(model_name, updates)
    return jax.tree.map(lambda u, lv: u * decay ** (head - lv), updates, levels), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def is_grouped(config) -> bool:
  c = config.optimizer
  return bool(parse_lr_mults(c.get("lr_mults", ""))) or float(c.get("layer_decay", 0.0)) > 0 \
      or int(config.train.get("freeze_backbone_epochs", 0)) > 0


def create_optimizer(config) -> optax.GradientTransformation:
  """`learning_rate` is left injectable: the train step sets it to schedule(step) * lr_scale.

  Fine-tuning (any of optimizer.lr_mults, optimizer.layer_decay, train.freeze_backbone_epochs):
  optax.multi_transform over the model's param groups (jaxclf/models/param_groups.py), the
  backbone's learning rate times its multiplier, optional layer-wise decay, gradient clipping
  over all groups together, and an injected `backbone_gate` (1 trains the backbone, 0 freezes it
  exactly: its gradients and updates are multiplied by 0, so its momentum stays empty)."""
  c = config.optimizer

  def base(learning_rate):
    return OPTIMIZERS[c.name](c, learning_rate)

  def clipped(tx):
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx) \
        if c.grad_clip_norm > 0 else tx

  if not is_grouped(config):
    return optax.inject_hyperparams(lambda learning_rate: clipped(base(learning_rate)))(
        learning_rate=c.learning_rate)
  mults = parse_lr_mults(c.get("lr_mults", ""))
  decay = float(c.get("layer_decay", 0.0))
  name = config.model.name
  if decay > 0 and not param_groups.supports_layer_decay(name):
    raise ValueError(f"optimizer.layer_decay: model {name!r} declares no layer order "
                     "(jaxclf/models/param_groups.py); use 0")

  def make(learning_rate, backbone_gate):
    backbone = optax.chain(optax.scale(backbone_gate),
                           base(learning_rate * mults.get("backbone", 1.0)),
                           optax.scale(backbone_gate))
    tx = optax.multi_transform({"head": base(learning_rate * mults.get("head", 1.0)),
                                "backbone": backbone}, param_groups.labels(name))
    if decay > 0:
      tx = optax.chain(tx, scale_by_layer_decay(name, decay))
    return clipped(tx)

  return optax.inject_hyperparams(make)(learning_rate=c.learning_rate, backbone_gate=1.0)
