"""Where a train step's time goes: sub-graphs of the default CNN's jitted step, timed in one run.

  .venv/bin/python bench/step_profile.py                      # configs/cnn.py net, batch 256
  .venv/bin/python bench/step_profile.py --conv-impl xla --out docs/results/step_profile_xla.json

Each row is one jitted function on the real shapes (synthetic data), timed after warm-up:
  step            the whole train step (forward, backward, SGD update, metrics), as the trainer runs it
  step_scan4      4 steps per dispatch (lax.scan over a stacked batch), per step: the dispatch lever
  step_prepare    the step with on-device augmentation + normalisation of a uint8 batch
  grad            forward + backward only (no optimizer, no metrics)
  forward_train   the forward pass in train mode (batch statistics)
  forward_eval    the forward pass with running statistics (what evaluation and serving run)
  optimizer       the SGD-Nesterov update on gradient-shaped trees
  batchnorm       layers.BatchNorm forward + backward on the net's activation shapes
  batchnorm_flax  the same with flax's nn.BatchNorm (autodiff), the lever's baseline
  maxpool         the 2x2 max pool forward + backward on the net's activation shapes
Prints JSON (ms per call and share of `step`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import emit  # noqa: E402
from jaxclf.config import load_config  # noqa: E402
from jaxclf.data import device_augment, transforms  # noqa: E402
from jaxclf.models import create_model  # noqa: E402
from jaxclf.models.layers import BatchNorm, max_pool_2x2, resolve_conv_impl  # noqa: E402
from jaxclf.train import steps  # noqa: E402
from jaxclf.train.optimizers import create_optimizer  # noqa: E402
from jaxclf.train.schedules import create_learning_rate_fn  # noqa: E402
from jaxclf.train.state import create_train_state  # noqa: E402


def timed(fn, *args, min_time=1.0, donate_state=False):
  """ms per call; `donate_state`: fn returns (state, ...) to feed back (donated buffers)."""
  out = fn(*args)
  jax.block_until_ready(out)
  n, t0 = 0, time.perf_counter()
  while True:
    if donate_state:
      args = (out[0],) + args[1:]
    out = fn(*args)
    n += 1
    jax.block_until_ready(out)
    if time.perf_counter() - t0 > min_time and n >= 3:
      break
  return 1000 * (time.perf_counter() - t0) / n


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--conv-impl", default="auto")
  p.add_argument("--batch", type=int, default=0, help="0: configs/cnn.py's")
  p.add_argument("--min-time", type=float, default=1.0)
  p.add_argument("--out", default="docs/results/step_profile.json")
  a = p.parse_args()
  c = load_config(os.path.join(ROOT, "configs/cnn.py"), environ={})
  batch = a.batch or int(c.train.batch_size)
  impl = resolve_conv_impl(a.conv_impl)
  model = create_model("cnn", 10, layers=tuple(c.model.kwargs.layers), conv_impl=impl)
  tx = create_optimizer(c)
  spec = transforms.PreprocessSpec()
  aug = transforms.AugmentSpec.from_config(c.augment)
  state = create_train_state(jax.random.key(0), model, (28, 28, 1), tx)
  lr_fn = create_learning_rate_fn(c, 100, 1000)
  kw = dict(lr_fn=lr_fn, label_smoothing=0.1, class_weights=jnp.ones(10),
            dropout_key=jax.random.key(1))
  rng = np.random.default_rng(0)
  b = {"image": jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32),
       "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  b8 = {"image": jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1)), jnp.uint8),
        "label": b["label"]}
  rows = {}

  step = jax.jit(partial(steps.train_step, **kw), donate_argnums=(0,))
  rows["step"] = timed(step, state, b, min_time=a.min_time, donate_state=True)
  state = create_train_state(jax.random.key(0), model, (28, 28, 1), tx)

  def scan4(st, stacked):
    return jax.lax.scan(lambda s, x: partial(steps.train_step, **kw)(s, x), st, stacked)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * 4), b)
  rows["step_scan4"] = timed(jax.jit(scan4, donate_argnums=(0,)), state, stacked,
                             min_time=a.min_time, donate_state=True) / 4
  state = create_train_state(jax.random.key(0), model, (28, 28, 1), tx)

  prep = device_augment.make_prepare_fn(spec, aug, jax.random.key(2))
  step_p = jax.jit(partial(steps.train_step, **kw, prepare=prep), donate_argnums=(0,))
  rows["step_prepare"] = timed(step_p, state, b8, min_time=a.min_time, donate_state=True)
  state = create_train_state(jax.random.key(0), model, (28, 28, 1), tx)

  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def loss(params, x, y):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return steps.cross_entropy(logits, y, 10, 0.1).mean()
  rows["grad"] = timed(jax.jit(jax.grad(loss)), state.params, b["image"], b["label"],
                       min_time=a.min_time)
  rows["forward_train"] = timed(jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})),
      variables, b["image"], min_time=a.min_time)
  rows["forward_eval"] = timed(jax.jit(lambda v, x: model.apply(v, x, train=False)), variables,
                               b["image"], min_time=a.min_time)
  grads = jax.tree.map(jnp.ones_like, state.params)

  def opt(params, opt_state, g):
    upd, opt_state = tx.update(g, opt_state, params)
    return jax.tree.map(jnp.add, params, upd), opt_state
  rows["optimizer"] = timed(jax.jit(opt), state.params, state.opt_state, grads,
                            min_time=a.min_time)

  # BatchNorm and pooling alone, on the activation shapes of the net (conv outputs / pool inputs).
  shapes, pool_shapes, size = [], [], 28
  for spec_ in c.model.kwargs.layers:
    if spec_ == "M":
      pool_shapes.append(shapes[-1])
      size //= 2
    else:
      shapes.append((batch, size, size, int(spec_)))
  acts = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  for row, bn in (("batchnorm", BatchNorm(use_running_average=False)),
                  ("batchnorm_flax", nn.BatchNorm(use_running_average=False, momentum=0.9,
                                                  epsilon=1e-5))):
    bn_vars = [bn.init(jax.random.key(0), x) for x in acts]

    def bn_loss(vs, xs, bn=bn):
      return sum((bn.apply(v, x, mutable=["batch_stats"])[0] ** 2).mean() for v, x in zip(vs, xs))
    rows[row] = timed(jax.jit(jax.grad(bn_loss, argnums=(0, 1))), bn_vars, acts,
                      min_time=a.min_time)
  pool_in = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in pool_shapes]
  rows["maxpool"] = timed(jax.jit(jax.grad(lambda xs: sum((max_pool_2x2(x) ** 2).mean()
                                                           for x in xs))),
                          pool_in, min_time=a.min_time)

  out = {"bench": "step_profile", "conv_impl": impl, "batch": batch,
         "layers": list(c.model.kwargs.layers), "load_avg": os.getloadavg(),
         "ms": {k: round(v, 2) for k, v in rows.items()},
         "share_of_step": {k: round(v / rows["step"], 3) for k, v in rows.items()},
         "images_per_sec": {k: round(batch / v * 1000, 1) for k, v in rows.items()
                            if k.startswith("step")}}
  emit(out, a.out)


if __name__ == "__main__":
  main()
