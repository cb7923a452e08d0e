"""Jitted train and eval steps. Pure functions of (state, batch); shardings are set by the loop."""

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from flax import struct

from jaxclf.data import mixing
from jaxclf.train import ema as ema_lib


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


def mixed_cross_entropy(logits, batch, num_classes, label_smoothing, class_weights):
  """Cross-entropy against Mixup/CutMix soft targets (mixing.mixed_targets: timm's mixup_target,
  smoothing included); each example weighs lam * w[y] + (1 - lam) * w[partner]."""
  lam = batch["mix_weight"]
  targets = mixing.mixed_targets(batch["label"], batch["mix_label"], lam, num_classes,
                                 label_smoothing)
  weight = lam * class_weights[batch["label"]] + (1 - lam) * class_weights[batch["mix_label"]]
  return optax.softmax_cross_entropy(logits, targets) * weight


def accuracy_labels(batch):
  """The labels training accuracy counts: with Mixup/CutMix the dominant label of each mixed
  target (the example's own when lam >= 0.5, else its partner's), without them the labels."""
  if "mix_weight" not in batch:
    return batch["label"]
  return jnp.where(batch["mix_weight"] >= 0.5, batch["label"], batch["mix_label"])


def train_step(state, batch, *, lr_fn, label_smoothing, class_weights, dropout_key,
               prepare=None, grad_accum_steps=1, freeze_backbone_steps=0,
               frozen_backbone=None, head_forward=None, freeze_batchnorm=False, ema=None):
  """One SGD step. Returns (new_state, metrics). Dropout RNG = fold_in(key, step), so a resumed run
  draws the same masks as an uninterrupted one. `prepare(batch, step)`, when given, turns the raw
  batch into model input inside the step (on-device augmentation and normalisation).

  `grad_accum_steps=K` splits the batch into K micro-batches inside this one jitted step (a scan:
  the activations of one micro-batch at a time) and applies their mean gradient once: the update
  of one K-times-larger batch. BatchNorm normalises and updates its statistics per micro-batch,
  as accumulation in PyTorch does. `state.loss_scale` (precision.DynamicLossScale, set for
  float16 compute) scales the loss before differentiation and skips the update when the
  gradients overflow. For the first `freeze_backbone_steps` steps a fine-tuning optimizer's
  backbone is frozen (its `backbone_gate` hyperparameter is 0).

  The frozen phase's own step (jaxclf/train/finetune.py) passes `frozen_backbone`, the params
  tree with True on every backbone leaf: the model runs in inference mode (BatchNorm running
  statistics, kept unchanged; no dropout or stochastic depth) and the backbone's gradients are
  zeros, so XLA drops the backward pass through it. With `head_forward(params, features)` the
  batch holds cached backbone features instead of images (train.cache_frozen_features).
  `freeze_batchnorm` (train.freeze_batchnorm) runs the ordinary step's forward in inference
  mode too: BatchNorm normalises with its running statistics and keeps them; the models tie
  dropout and stochastic depth to the same flag, so those are off as well.

  A batch that `prepare` mixed (augment.mixup / augment.cutmix: `mix_label`, `mix_weight`)
  trains on soft targets, and its training accuracy counts each mixed target's dominant label
  (`accuracy_labels`); the evaluators never mix.

  `ema` (ema.EmaSettings, train.ema on) moves the state's weight average towards the updated
  params and BatchNorm statistics, here inside the step (jaxclf/train/ema.py)."""
  num_classes = class_weights.shape[0]
  loss_scale = state.loss_scale
  rng = jax.random.fold_in(dropout_key, state.step)
  if prepare is not None:
    batch = prepare(batch, state.step)

  def loss_fn(params, batch_stats, micro, key):
    if frozen_backbone is not None:
      logits = head_forward(params, micro["features"]) if head_forward is not None else \
          state.apply_fn({"params": params, "batch_stats": batch_stats}, micro["image"],
                         train=False)
      updates = {}
    else:
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": batch_stats}, micro["image"],
          train=not freeze_batchnorm, mutable=["batch_stats"], rngs={"dropout": key})
    if "mix_weight" in micro:  # augment.mixup / augment.cutmix: soft targets
      loss = mixed_cross_entropy(logits, micro, num_classes, label_smoothing, class_weights)
    else:
      loss = cross_entropy(logits, micro["label"], num_classes, label_smoothing, class_weights)
    loss = loss.mean()
    scaled = loss_scale.scale_loss(loss) if loss_scale is not None else loss
    return scaled, (loss, logits, updates.get("batch_stats", batch_stats))

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    grads, (loss, logits, batch_stats) = grad_fn(state.params, state.batch_stats, batch, rng)
  else:
    grads, (loss, logits, batch_stats) = _accumulate(grad_fn, state, batch, rng,
                                                     grad_accum_steps)
  if frozen_backbone is not None:
    grads = jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g, grads,
                         frozen_backbone)
  finite = jnp.array(True)
  if loss_scale is not None:
    grads = loss_scale.unscale(grads)
    finite = all_finite(grads)
  lr = lr_fn(state.step) * state.lr_scale
  state.opt_state.hyperparams["learning_rate"] = lr
  if "backbone_gate" in state.opt_state.hyperparams:  # optimizers.create_optimizer, fine-tuning
    state.opt_state.hyperparams["backbone_gate"] = jnp.where(
        state.step >= freeze_backbone_steps, 1.0, 0.0)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if loss_scale is not None:  # an overflowing step changes nothing but the scale (and the step)
    new_state = _keep_if_not_finite(finite, new_state, state).replace(
        step=new_state.step, loss_scale=loss_scale.adjust(finite))
  if ema is not None and ema.enabled:  # train.ema: after the update, from what it produced
    new_state = ema_lib.update(new_state, ema)
  metrics = TrainMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=accuracy_labels(batch), grad_norm=optax.global_norm(grads),
      param_norm=optax.global_norm(new_state.params), learning_rate=lr)
  return new_state, metrics


def _accumulate(grad_fn, state, batch, rng, k):
  """Mean gradient over k micro-batches, scanned. Micro-batch j takes rows j, j+k, j+2k, ... so
  that each micro-batch is spread over every device of a batch sharded on its first axis (each
  device's contiguous block of rows holds its share of every micro-batch): no resharding."""
  n = batch["label"].shape[0]
  if n % k:
    raise ValueError(f"a batch of {n} does not split into train.grad_accum_steps={k} "
                     "micro-batches")
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(n // k, k, *x.shape[1:]), 0, 1), batch)

  def body(carry, xs):
    grads_sum, batch_stats = carry
    mb, j = xs
    g, (loss, logits, batch_stats) = grad_fn(state.params, batch_stats, mb,
                                             jax.random.fold_in(rng, j))
    return (jax.tree.map(jnp.add, grads_sum, g), batch_stats), (loss, logits)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, batch_stats), (losses, logits) = jax.lax.scan(
      body, (zeros, state.batch_stats), (micro, jnp.arange(k)))
  grads = jax.tree.map(lambda g: g / k, grads)
  # Back to the batch's row order, so that metrics pair each logit with its label.
  logits = jnp.swapaxes(logits, 0, 1).reshape(n, logits.shape[-1])
  return grads, (losses.mean(), logits, batch_stats)


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _keep_if_not_finite(finite, new, old):
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def predict_logits(state_or_vars, apply_fn, images, tta_flip=False):
  variables = state_or_vars
  logits = apply_fn(variables, images, train=False)
  if tta_flip:
    logits = 0.5 * (logits + apply_fn(variables, images[:, :, ::-1], train=False))
  return logits


def eval_step(state, batch, *, num_classes, tta_flip=False, prepare=None):
  variables = ema_lib.inference_variables(state)  # the average when train.ema is on
  if prepare is not None:
    batch = prepare(batch, state.step)
  logits = predict_logits(variables, state.apply_fn, batch["image"], tta_flip)
  loss = cross_entropy(logits, batch["label"], num_classes)
  # Padded examples (label -1) carry mask 0 and count for nothing.
  mask = batch["label"] >= 0
  return EvalMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=jnp.where(mask, batch["label"], 0), mask=mask), logits
