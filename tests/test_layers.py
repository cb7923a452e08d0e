"""layers.Conv against nn.Conv: same parameters and names, same values and gradients for every
gradient implementation (float32 rounding, scaled by the magnitude, so any CPU passes)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.models import create_model
from jaxclf.models.layers import CONV_IMPLS, Conv, conv2d, max_pool_2x2, resolve_conv_impl
from jaxclf.ops import onednn

# oneDNN always: the test command builds the extension (scripts/setup.sh fails where it cannot).
IMPLS = ["matmul", "onednn"]


def built(impl: str) -> str:
  """`impl`, failing (not skipping) a oneDNN case without the extension: conv2d would fall back
  to lax and the case would compare lax with itself."""
  if impl == "onednn" and not onednn.available():
    pytest.fail(f"the oneDNN extension is not built/loadable: {onednn.load_error()} "
                "(bash scripts/setup.sh builds it)")
  return impl


@pytest.fixture(autouse=True)
def _onednn_cases_need_the_extension(request):
  callspec = getattr(request.node, "callspec", None)
  if callspec is not None:
    built(callspec.params.get("impl", ""))


CASES = [  # (batch, size, cin, cout, kernel, strides, padding)
    (4, 12, 8, 16, (3, 3), (1, 1), "SAME"),
    (3, 9, 5, 7, (3, 3), (2, 2), "SAME"),
    (2, 8, 6, 4, (1, 1), (2, 2), "SAME"),
    (2, 11, 3, 8, (7, 7), (2, 2), ((3, 3), (3, 3))),
    (2, 10, 4, 6, (3, 3), (1, 1), "VALID"),
]


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}px-{c[2]}to{c[3]}-k{c[4][0]}s{c[5][0]}")
def test_conv_equals_nn_conv_forward_and_gradients(impl, case):
  b, size, cin, cout, k, strides, padding = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, size, size, cin)), jnp.float32)
  ref_mod = nn.Conv(cout, k, strides, padding=padding, use_bias=True)
  mod = Conv(cout, k, strides, padding=padding, use_bias=True, impl=impl)
  variables = ref_mod.init(jax.random.key(1), x)
  mine = mod.init(jax.random.key(1), x)
  assert jax.tree.map(np.shape, mine) == jax.tree.map(np.shape, variables)
  jax.tree.map(np.testing.assert_array_equal, mine, variables)  # same init, same names

  def loss(m):
    return lambda v, x: (m.apply(v, x) ** 2 * jnp.arange(cout)).sum()

  y_ref, y = ref_mod.apply(variables, x), jax.jit(mod.apply)(variables, x)
  assert rel_err(y, y_ref) < 1e-5
  g_ref = jax.grad(loss(ref_mod), argnums=(0, 1))(variables, x)
  g = jax.jit(jax.grad(loss(mod), argnums=(0, 1)))(variables, x)
  for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_are_deterministic(impl):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 14, 14, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
  f = jax.jit(jax.grad(lambda x, w: conv2d(x, w, impl=impl).sum() ** 2, argnums=(0, 1)))
  a, b = f(x, w), f(x, w)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# VGG adds no layer kind that the CNN (conv, pool) and ResNet (BatchNorm, strided conv, skip) do
# not have: its cases run with -m slow.
@pytest.mark.parametrize("name", ["cnn", "resnet_tiny",
                                  pytest.param("vgg_tiny", marks=pytest.mark.slow)])
def test_models_keep_their_parameter_paths_and_values_whatever_the_conv_impl(name):
  x = jnp.zeros((2, 28, 28, 1))
  ref = create_model(name, 10).init(jax.random.key(0), x, train=False)
  for impl in map(built, IMPLS):
    v = create_model(name, 10, conv_impl=impl).init(jax.random.key(0), x, train=False)
    jax.tree.map(np.testing.assert_array_equal, v, ref)


def test_auto_resolves_to_a_real_impl_and_unknown_names_fail():
  assert resolve_conv_impl("auto") in CONV_IMPLS[1:]
  assert resolve_conv_impl("auto") == ("onednn" if onednn.available() else "matmul")
  with pytest.raises(ValueError, match="conv impl"):
    resolve_conv_impl("cudnn")


@pytest.mark.parametrize("impl", ["xla"] + IMPLS)
def test_max_pool_2x2_equals_nn_max_pool_values_and_gradients(impl):
  # Odd sizes: VALID pooling drops the last row/column; they must get a zero gradient.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 9, 3)), jnp.float32)
  ref = lambda x: nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
  proj = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 3)), jnp.float32)
  np.testing.assert_array_equal(jax.jit(lambda x: max_pool_2x2(x, impl))(x), ref(x))
  g = jax.jit(jax.grad(lambda x: (max_pool_2x2(x, impl) * proj).sum()))(x)
  np.testing.assert_array_equal(g, jax.grad(lambda x: (ref(x) * proj).sum())(x))


def _bn_input(rng, shape, away_from_zero: bool):
  """Activations for the BatchNorm test. With a ReLU after the norm, no normalised value may sit
  on the kink, where float rounding (which differs between CPUs) could flip the mask: draw values
  >= 0.5 from zero, then standardise per channel, so the normalised values are those draws."""
  if not away_from_zero:
    return jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  z = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
  z = (z - z.mean(axis=(0, 1, 2))) / z.std(axis=(0, 1, 2))
  assert np.abs(z).min() > 0.05
  return jnp.asarray(z * 3 + 1, jnp.float32)


@pytest.mark.parametrize("impl", ["xla"] + IMPLS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_equals_flax_batchnorm_values_gradients_and_running_stats(train, relu, impl):
  from jaxclf.models.layers import BatchNorm
  rng = np.random.default_rng(0)
  x = _bn_input(rng, (8, 6, 6, 5), away_from_zero=relu and train)
  proj = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  mine = BatchNorm(use_running_average=not train, relu=relu, impl=impl)
  init = flax_bn.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, mine.init(jax.random.key(0), x), init)
  bias = jnp.zeros(5) if relu else jnp.linspace(-1, 1, 5)
  v = {"params": {"scale": jnp.linspace(0.5, 2, 5), "bias": bias},
       "batch_stats": {"mean": jnp.full(5, 0.3), "var": jnp.full(5, 2.0)}}
  act = nn.relu if relu else (lambda y: y)

  def run(apply, post):
    def f(v, x):
      out = apply(v, x, mutable=["batch_stats"]) if train else (apply(v, x), {})
      return (jnp.tanh(post(out[0])) * proj).sum(), out[1]
    return f

  (l_ref, s_ref), g_ref = jax.value_and_grad(run(flax_bn.apply, act), argnums=(0, 1),
                                             has_aux=True)(v, x)
  (l, s), g = jax.jit(jax.value_and_grad(run(mine.apply, lambda y: y), argnums=(0, 1),
                                         has_aux=True))(v, x)
  assert rel_err(l, l_ref) < 1e-5
  for a, r in zip(jax.tree.leaves((g, s)), jax.tree.leaves((g_ref, s_ref))):
    assert np.abs(np.asarray(a) - np.asarray(r)).max() <= 1e-5 * max(np.abs(np.asarray(r)).max(), 1.0)




@pytest.mark.parametrize("name,kwargs", [("cnn", {"layers": (32, "M", 64, "M", 128)}),
                                         pytest.param("vgg_tiny", {}, marks=pytest.mark.slow),
                                         ("resnet_tiny", {})])
def test_whole_model_train_step_matches_the_xla_path(name, kwargs):
  """Loss, gradients and new batch statistics of a train-mode pass, each impl against 'xla'
  (conv, BatchNorm+ReLU and pooling all swapped). A ReLU unit whose input sits within rounding
  of zero can flip between paths, so leaves are compared at 1e-3 of their own scale.
  Not the full default CNN (or any net whose stem has 64 filters) at this initialisation: there the
  loss is not differentiable along some directions (a central finite difference along the
  difference of two implementations' gradients lands between them, stable from h=3e-3 to 3e-2),
  so float32 rounding picks the subgradient and the patches stem, lax's conv and oneDNN disagree by
  up to ~50% on the lower layers, while along the gradient itself all three match the finite
  difference to 0.5%. Its layers are covered one by one above."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16))
  ref_model = create_model(name, 10, **kwargs)
  variables = ref_model.init(jax.random.key(0), x, train=False)

  def loss(model):
    def f(params, x):
      logits, upd = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), upd
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (l_ref, s_ref), g_ref = loss(ref_model)(variables["params"], x)
  for impl in map(built, IMPLS):
    (l, s), g = loss(create_model(name, 10, conv_impl=impl, **kwargs))(variables["params"], x)
    assert rel_err(l, l_ref) < 1e-5, impl
    for a, r in zip(jax.tree.leaves((g, s)), jax.tree.leaves((g_ref, s_ref))):
      assert np.abs(np.asarray(a) - np.asarray(r)).max() <= 1e-3 * max(
          np.abs(np.asarray(r)).max(), 1e-6), impl
