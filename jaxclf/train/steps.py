"""Jitted train and eval steps. Pure functions of (state, batch); shardings are set by the loop."""

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from flax import struct


@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  accuracy: clu_metrics.Accuracy
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  param_norm: clu_metrics.LastValue.from_output("param_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


@struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  accuracy: clu_metrics.Accuracy


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0, class_weights=None):
  """Per-example smoothed cross-entropy, optionally weighted by the label's class weight."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets)
  if class_weights is not None:
    loss = loss * class_weights[labels]
  return loss


def train_step(state, batch, *, lr_fn, label_smoothing, class_weights, dropout_key,
               prepare=None):
  """One SGD step. Returns (new_state, metrics). Dropout RNG = fold_in(key, step), so a resumed run
  draws the same masks as an uninterrupted one. `prepare(batch, step)`, when given, turns the raw
  batch into model input inside the step (on-device augmentation and normalisation)."""
  num_classes = class_weights.shape[0]
  rng = jax.random.fold_in(dropout_key, state.step)
  if prepare is not None:
    batch = prepare(batch, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing, class_weights)
    return loss.mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  lr = lr_fn(state.step) * state.lr_scale
  state.opt_state.hyperparams["learning_rate"] = lr
  new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  metrics = TrainMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=batch["label"], grad_norm=optax.global_norm(grads),
      param_norm=optax.global_norm(new_state.params), learning_rate=lr)
  return new_state, metrics


def predict_logits(state_or_vars, apply_fn, images, tta_flip=False):
  variables = state_or_vars
  logits = apply_fn(variables, images, train=False)
  if tta_flip:
    logits = 0.5 * (logits + apply_fn(variables, images[:, :, ::-1], train=False))
  return logits


def eval_step(state, batch, *, num_classes, tta_flip=False, prepare=None):
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if prepare is not None:
    batch = prepare(batch, state.step)
  logits = predict_logits(variables, state.apply_fn, batch["image"], tta_flip)
  loss = cross_entropy(logits, batch["label"], num_classes)
  # Padded examples (label -1) carry mask 0 and count for nothing.
  mask = batch["label"] >= 0
  return EvalMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=jnp.where(mask, batch["label"], 0), mask=mask), logits
