"""EfficientNet-B0 / Lite0 in Flax: sizes, scaling rules, small inputs, stochastic depth, training."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclf.models import create_model, model_names
from jaxclf.models.efficientnet import EfficientNet, round_filters, round_repeats


def shapes(model, size=224, channels=3):
  """Variable shapes without computing anything (eval_shape), so full-size models stay cheap."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                           train=False))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def block_names(variables) -> list[str]:
  return sorted((k for k in variables["params"] if k.startswith("block")), key=lambda k: int(k[5:]))


def test_registered_names():
  assert {"efficientnet_b0", "efficientnet_lite0", "efficientnet_tiny"} <= set(model_names())


def test_b0_and_lite0_parameter_counts_match_the_published_models():
  # B0: 5,288,548 (the paper's 5.3M; lukemelas/torchvision count the same). Lite0: 4,652,008, which
  # is the ImageNet checkpoint's 4,694,073 values less 42,016 BN statistics and 49 BN step counters.
  b0 = shapes(create_model("efficientnet_b0", num_classes=1000))
  lite0 = shapes(create_model("efficientnet_lite0", num_classes=1000))
  assert count(b0["params"]) == 5_288_548
  assert count(lite0["params"]) == 4_652_008
  assert count(lite0["batch_stats"]) == 42_016
  assert len(block_names(b0)) == len(block_names(lite0)) == 16


def test_lite_has_no_squeeze_excite_and_b0_has_it_everywhere():
  b0 = shapes(create_model("efficientnet_b0", num_classes=10))
  lite0 = shapes(create_model("efficientnet_lite0", num_classes=10))
  assert all("se_reduce" in b0["params"][b] for b in block_names(b0))
  assert not any("se_reduce" in lite0["params"][b] for b in block_names(lite0))
  # SE squeezes to a quarter of the block's *input* channels: block 0 takes the 32-wide stem.
  assert b0["params"]["block0"]["se_reduce"]["kernel"].shape == (1, 1, 32, 8)


def test_scaling_rules_follow_the_reference():
  # Values from the EfficientNet family tables: B2 (1.1) keeps a 32 stem, head 1408; B4 (1.4) 48/1792.
  assert round_filters(32, 1.1) == 32 and round_filters(1280, 1.1) == 1408
  assert round_filters(32, 1.4) == 48 and round_filters(1280, 1.4) == 1792
  assert round_filters(16, 0.25) == 8  # never below the divisor
  assert round_repeats(3, 1.8) == 6 and round_repeats(1, 1.1) == 2


def test_lite_keeps_stem_head_and_end_stages_fixed_when_scaled():
  # Lite4 coefficients: width 1.4, depth 1.8. Stem 32 and head 1280 stay; first/last stage keep 1 block.
  lite4 = shapes(EfficientNet(num_classes=10, width_coefficient=1.4, depth_coefficient=1.8, lite=True))
  b4 = shapes(EfficientNet(num_classes=10, width_coefficient=1.4, depth_coefficient=1.8))
  assert lite4["params"]["stem_conv"]["kernel"].shape[-1] == 32
  assert lite4["params"]["head_conv"]["kernel"].shape[-1] == 1280
  assert b4["params"]["stem_conv"]["kernel"].shape[-1] == 48
  # stages 1..5 scaled: 4+4+6+6+8 = 28, plus 1 + 1 unscaled ends
  assert len(block_names(lite4)) == 30
  assert len(block_names(b4)) == 2 + 28 + 2


@pytest.fixture(scope="module")
def tiny():
  """One initialisation shared by the tests below (init dominates their time on a busy CPU).
  Every forward pass below is jitted: eagerly, each of the net's few hundred ops is dispatched
  and compiled on its own, which took most of these tests' time."""
  model = create_model("efficientnet_tiny", num_classes=10)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                         train=False))()
  return model, variables


def eval_apply(model):
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


@pytest.mark.parametrize("size", [28, 33])
def test_tiny_runs_on_small_and_odd_inputs(tiny, size):
  model, variables = tiny
  x = jax.random.normal(jax.random.key(1), (2, size, size, 1))
  logits = eval_apply(model)(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # The tiny variant is B0's first three stages (1, 2, 2 blocks) with SE in every block; blocks 2
  # and 4 are residual (stride 1, same width), which the stochastic-depth test below relies on.
  names = block_names(variables)
  assert len(names) == 5 and all("se_reduce" in variables["params"][b] for b in names)
  assert count(variables["params"]) < 50_000  # B0 has 5.3M


def test_train_mode_updates_batch_stats_and_stochastic_depth_uses_the_dropout_rng(tiny):
  model, variables = tiny
  model = model.clone(drop_connect_rate=0.5)  # same parameters; stochastic depth on
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))

  @jax.jit
  def train_apply(variables, x, key):
    return model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                       rngs={"dropout": key},
                       capture_intermediates=lambda mdl, _: mdl.name in ("stem_conv", "head_conv"))
  out = {}
  for seed in (0, 1):
    out[seed], mutated = train_apply(variables, x, jax.random.key(seed))
    updates, inter = mutated, mutated["intermediates"]
  assert not np.allclose(out[0], out[1])  # different blocks dropped
  # The running statistics moved towards this batch's own statistics (the BatchNorm input is the
  # conv output): new = m * old + (1 - m) * batch, with flax's biased variance. The head's input is
  # a BatchNorm output, so its batch mean is 0 up to float32 rounding: the tolerance is float32
  # rounding at the activations' scale, and "it moved" is asserted only where the rule says the
  # move is larger than that, so no CPU's rounding can flip the result.
  m = model.bn_momentum
  for layer, conv in (("stem_bn", "stem_conv"), ("head_bn", "head_conv")):
    h = np.asarray(inter[conv]["__call__"][0], np.float64)
    atol = 1e-6 * np.abs(h).max()
    batch_mean = h.mean(axis=(0, 1, 2))
    batch_var = (h ** 2).mean(axis=(0, 1, 2)) - batch_mean ** 2
    for stat, batch in (("mean", batch_mean), ("var", batch_var)):
      old = np.asarray(variables["batch_stats"][layer][stat], np.float64)
      new = np.asarray(updates["batch_stats"][layer][stat], np.float64)
      want = m * old + (1 - m) * batch
      np.testing.assert_allclose(new, want, rtol=0, atol=atol, err_msg=f"{layer}.{stat}")
      moved = np.abs(want - old) > 10 * atol
      assert np.all(new[moved] != old[moved]), f"{layer}.{stat} was not updated"
    assert moved.any(), f"{layer}.var: this batch should move the running variance"
  apply = eval_apply(model)  # one compilation, run twice
  e1 = apply(variables, x)
  e2 = apply(variables, x)
  np.testing.assert_array_equal(e1, e2)  # eval is deterministic, no rng needed


def test_one_sgd_step_reduces_the_loss_on_a_fixed_batch(tiny):
  model, variables = tiny
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=16))
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(p, stats):
    logits, updates = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  @jax.jit
  def step(p, stats, opt):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
    upd, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, upd), updates["batch_stats"], opt, loss

  new_params, new_stats, _, loss_before = step(params, batch_stats, opt_state)
  loss_after, _ = jax.jit(loss_fn)(new_params, new_stats)
  assert np.isfinite(float(loss_before))
  assert float(loss_after) < float(loss_before)
