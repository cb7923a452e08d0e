"""Gradient accumulation inside the jitted step, and mixed precision (bf16, fp16 with a dynamic
loss scale): one real step each, on real models."""
from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclf.models.cnn import CNN
from jaxclf.train import precision, steps
from jaxclf.train.state import create_train_state


def make_state(model, loss_scale=None, lr=0.1):
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9)
  return create_train_state(jax.random.key(0), model, (8, 8, 1), tx, loss_scale=loss_scale)


def batch(n=32, seed=1):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


@functools.lru_cache(maxsize=None)
def step_fn(k):  # one jitted step per K (each call of a fresh jit would compile again)
  return jax.jit(partial(steps.train_step, lr_fn=lambda s: 0.1, label_smoothing=0.1,
                         class_weights=jnp.ones(10), dropout_key=jax.random.key(2),
                         grad_accum_steps=k))


def rel_err(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(float(jnp.abs(x - y).max() / (jnp.abs(y).max() + 1e-12)) for x, y in zip(a, b))


def test_accumulated_step_is_the_large_batch_step():
  """4 micro-batches of 8 = one batch of 32, to 1e-5 relative in fp32, over 3 steps (the
  momentum carries the gradients forward). No BatchNorm or dropout: nothing else depends on the
  batch."""
  mlp = CNN(num_classes=10, layers=(), hidden=(32,), dropout=0.0)
  big, acc = make_state(mlp), make_state(mlp)
  for i in range(3):
    b = batch(seed=i)
    big, m_big = step_fn(1)(big, b)
    acc, m_acc = step_fn(4)(acc, b)
    assert rel_err(acc.params, big.params) < 1e-5
    np.testing.assert_allclose(m_acc.compute()["loss"], m_big.compute()["loss"], rtol=1e-5)
    # every row's logit is paired with its own label
    np.testing.assert_allclose(m_acc.compute()["accuracy"], m_big.compute()["accuracy"])
  assert int(acc.step) == 3 and rel_err(big.params, make_state(mlp).params) > 1e-3


def test_accumulation_with_batchnorm_updates_statistics_per_micro_batch():
  cnn = CNN(num_classes=10, layers=(8, "M"), dropout=0.2)
  s0 = make_state(cnn)
  s1, m = step_fn(4)(s0, batch())
  assert m.compute()["accuracy"].shape == () and np.isfinite(m.compute()["loss"])
  # 4 momentum updates (0.9 each) of the running mean, not 1: the statistics moved further
  s_one, _ = step_fn(1)(s0, batch())
  moved = lambda s: float(jnp.abs(jax.tree.leaves(s.batch_stats)[0] -
                                  jax.tree.leaves(s0.batch_stats)[0]).sum())
  assert moved(s1) > 1.5 * moved(s_one)
  with pytest.raises(ValueError, match="does not split into train.grad_accum_steps=5"):
    step_fn(5)(s0, batch())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_computes_in_it_and_keeps_float32_state(dtype):
  cnn = CNN(num_classes=10, layers=(8, "M"), dropout=0.0, dtype=precision.compute_dtype(dtype))
  s0 = make_state(cnn, loss_scale=precision.create_loss_scale(dtype))
  assert (s0.loss_scale is not None) == (dtype == "float16")
  s1, m = step_fn(1)(s0, batch())
  assert np.isfinite(m.compute()["loss"])
  for tree in (s1.params, s1.batch_stats, s1.opt_state):
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(tree)), tree
  assert rel_err(s1.params, s0.params) > 1e-4
  fp32 = make_state(CNN(num_classes=10, layers=(8, "M"), dropout=0.0))
  f1, m32 = step_fn(1)(fp32, batch())
  # the same step in float32, to low-precision accuracy
  np.testing.assert_allclose(m.compute()["loss"], m32.compute()["loss"], rtol=3e-2)


def test_float16_overflow_skips_the_update_and_halves_the_scale():
  cnn = CNN(num_classes=10, layers=(8, "M"), dropout=0.0, dtype=jnp.float16)
  huge = precision.DynamicLossScale.create(initial=2.0 ** 120)  # loss x scale overflows fp16
  s0 = make_state(cnn, loss_scale=huge)
  s1, _ = step_fn(1)(s0, batch())
  assert rel_err(s1.params, s0.params) == 0.0 and int(s1.step) == 1
  assert float(s1.loss_scale.scale) == 2.0 ** 119 and int(s1.loss_scale.counter) == 0
  ok = make_state(cnn, loss_scale=precision.DynamicLossScale.create(initial=2.0 ** 8, period=2))
  ok1, _ = step_fn(1)(ok, batch())
  ok2, _ = step_fn(1)(ok1, batch(seed=3))
  assert rel_err(ok1.params, ok.params) > 1e-4
  assert int(ok1.loss_scale.counter) == 1 and float(ok2.loss_scale.scale) == 2.0 ** 9
