"""Optimizers by name. Weight decay never touches BatchNorm scales or biases (kernels only);
the learning rate is an injected hyperparameter so the step can scale it (plateau).
optimizer.bias_lr_mult scales the learning rate of every 1-d parameter (biases, BN scales), and
frozen parameters (the CNN's whitening filters) get a zero update."""
from __future__ import annotations

from typing import Callable

import jax
import optax

from jaxclf.config.names import OPTIMIZER_NAMES, check_table, parse_lr_mults
from jaxclf.models import param_groups, whitening


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


def _frozen(config):
  """A predicate on params-tree paths for parameters that never train, or None if none do."""
  kwargs = config.model.get("kwargs") or {}
  return whitening.is_frozen if kwargs.get("stem") == "whiten" else None


def _partitioned(group_txs: dict, group_of: Callable, bias_mult: float, frozen):
  """optax.multi_transform over the groups of `group_txs` ({group: lr multiplier -> transform}),
  each split into its weights and its 1-d parameters (at `bias_mult` x the group's rate) when
  bias_mult != 1, plus a 'frozen' group with zero updates (so no weight decay either).
  `group_of(path)` names a leaf's group. Splitting per leaf leaves each leaf's maths as it was:
  momentum, Adam moments and decoupled decay are all per leaf."""
  split = bias_mult != 1.0
  txs = {}
  for group, make in group_txs.items():
    txs[group] = make(1.0)
    if split:
      txs[group + "/bias"] = make(bias_mult)
  if frozen is not None:
    txs["frozen"] = optax.set_to_zero()

  def label(path, p):
    if frozen is not None and frozen(path):
      return "frozen"
    return group_of(path) + ("/bias" if split and p.ndim == 1 else "")
  return optax.multi_transform(txs, lambda params: jax.tree_util.tree_map_with_path(label, params))


def create_optimizer(config) -> optax.GradientTransformation:
  """`learning_rate` is left injectable: the train step sets it to schedule(step) * lr_scale.

  Fine-tuning (any of optimizer.lr_mults, optimizer.layer_decay, train.freeze_backbone_epochs):
  optax.multi_transform over the model's param groups (jaxclf/models/param_groups.py), the
  backbone's learning rate times its multiplier, optional layer-wise decay, gradient clipping
  over all groups together, and an injected `backbone_gate` (1 trains the backbone, 0 freezes it
  exactly: its gradients and updates are multiplied by 0, so its momentum stays empty).
  optimizer.bias_lr_mult and frozen parameters partition each group further (_partitioned);
  with neither, the transform is the plain one."""
  c = config.optimizer
  bias_mult = float(c.get("bias_lr_mult", 1.0))
  frozen = _frozen(config)

  def base(learning_rate):
    return OPTIMIZERS[c.name](c, learning_rate)

  def clipped(tx):
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx) \
        if c.grad_clip_norm > 0 else tx

  if not is_grouped(config):
    if bias_mult == 1.0 and frozen is None:
      return optax.inject_hyperparams(lambda learning_rate: clipped(base(learning_rate)))(
          learning_rate=c.learning_rate)
    return optax.inject_hyperparams(lambda learning_rate: clipped(_partitioned(
        {"all": lambda m: base(learning_rate * m)}, lambda path: "all", bias_mult, frozen)))(
        learning_rate=c.learning_rate)
  mults = parse_lr_mults(c.get("lr_mults", ""))
  decay = float(c.get("layer_decay", 0.0))
  name = config.model.name
  if decay > 0 and not param_groups.supports_layer_decay(name):
    raise ValueError(f"optimizer.layer_decay: model {name!r} declares no layer order "
                     "(jaxclf/models/param_groups.py); use 0")

  def make(learning_rate, backbone_gate):
    def backbone(m):
      return optax.chain(optax.scale(backbone_gate),
                         base(learning_rate * mults.get("backbone", 1.0) * m),
                         optax.scale(backbone_gate))
    groups = {"head": lambda m: base(learning_rate * mults.get("head", 1.0) * m),
              "backbone": backbone}
    if bias_mult == 1.0 and frozen is None:  # the fine-tuning transform as it always was
      tx = optax.multi_transform({g: f(1.0) for g, f in groups.items()}, param_groups.labels(name))
    else:
      tx = _partitioned(groups, lambda path: param_groups.group_of(name, path), bias_mult, frozen)
    if decay > 0:
      tx = optax.chain(tx, scale_by_layer_decay(name, decay))
    return clipped(tx)

  return optax.inject_hyperparams(make)(learning_rate=c.learning_rate, backbone_gate=1.0)
