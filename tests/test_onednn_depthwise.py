"""oneDNN grouped / depthwise convolution (jaxclf.ops.onednn.conv2d(groups=...)) and EfficientNet
on the oneDNN kernels (conv_impl='onednn'): forward and both gradients equal lax's grouped
convolution within a bound derived from float32 arithmetic, the same parameters and module paths
as the XLA model, and an ONNX export that keeps standard ops.

The bound, per output element: a float32 sum of L products, accumulated in any order (oneDNN and
XLA pick different orders, and other ones on other CPUs), is within gamma_L * sum|products| of the
exact sum, gamma_L = L*u / (1 - L*u), u = 2**-24 (Higham, Accuracy and Stability, 3.1). Two
implementations that each meet it differ by at most 2 * gamma_L * (|a| conv |b|), where |a| conv
|b| is the same convolution of the absolute values. L is KH*KW*C/G for the forward and
backward-data, N*OH*OW for backward-weights. A wrong stride, pad, group mapping or kernel flip
gives differences of the order of the values themselves, far above that bound.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxclf.ops import onednn

DIMS = ("NHWC", "HWIO", "NHWC")
U = 2.0 ** -24


def _gamma(n: int) -> float:
  return n * U / (1 - n * U)


@pytest.fixture(autouse=True)
def _built():
  """Without the extension conv2d is lax itself, and a comparison with lax would prove nothing."""
  assert onednn.available(), f"oneDNN extension not built/loadable: {onednn.load_error()}"


def _lax(x, w, s, groups, padding="SAME"):
  return lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=DIMS,
                                  feature_group_count=groups)


def _assert_within(got, want, bound, what):
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  worst = float(np.max(err - np.asarray(bound, np.float64)))
  assert worst <= 0, f"{what}: exceeds the float32 bound by {worst:.3g} (max err {err.max():.3g})"


# (batch, H=W, channels, kernel, stride, groups): Lite0 / B0's depthwise shapes (k3 and k5, both
# strides, even and odd sizes, the widest stages), and a grouped conv with 4 channels per group.
CASES = [(4, 16, 32, 3, 1, 32), (4, 16, 96, 3, 2, 96), (3, 15, 144, 5, 2, 144),
         (2, 8, 240, 5, 1, 240), (2, 5, 672, 5, 2, 672), (2, 4, 1152, 3, 1, 1152),
         (2, 9, 16, 3, 1, 4)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_{}px_c{}_k{}_s{}_g{}".format(*c))
def test_forward_and_both_gradients_match_lax_grouped_conv(case):
  n, hw, c, k, s, g = case
  rng = np.random.default_rng(hash(case) % 2**32)
  x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c // g, c)), jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda x, w: _lax(x, w, s, g), x, w)
  dy = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  dx_ref, dw_ref = vjp_ref(dy)

  def ours(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: onednn.conv2d(x, w, strides=(s, s), groups=g), x, w)
    return (y, *vjp(dy))

  y, dx, dw = jax.jit(ours)(x, w, dy)
  assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == w.shape
  ax, aw, ady = jnp.abs(x), jnp.abs(w), jnp.abs(dy)
  # The same operations on absolute values give sum|products| for every output element.
  y_abs = _lax(ax, aw, s, g)
  _, vjp_abs = jax.vjp(lambda x, w: _lax(x, w, s, g), ax, aw)
  dx_abs, dw_abs = vjp_abs(ady)
  l_fwd = k * k * (c // g)
  l_dx = k * k * (c // g)  # per input element: at most k*k taps of each of its group's outputs
  l_dw = n * y.shape[1] * y.shape[2]
  _assert_within(y, y_ref, 2 * _gamma(l_fwd) * y_abs, "forward")
  _assert_within(dx, dx_ref, 2 * _gamma(l_dx) * dx_abs, "backward-data")
  _assert_within(dw, dw_ref, 2 * _gamma(l_dw) * dw_abs, "backward-weights")
  # And the bound is tight enough to mean something: a wrong stride-phase (the kernel flipped)
  # differs from the reference far beyond it.
  flipped = onednn.conv2d(x, w[::-1, ::-1], strides=(s, s), groups=g)
  assert np.max(np.abs(np.asarray(flipped) - np.asarray(y_ref)) - 2 * _gamma(l_fwd)
                * np.asarray(y_abs)) > 0


def test_depthwise_is_deterministic_run_to_run():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16, 144)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(5, 5, 1, 144)), jnp.float32)
  f = jax.jit(jax.grad(lambda x, w: (onednn.conv2d(x, w, strides=(2, 2), groups=144) ** 2).sum(),
                       argnums=(0, 1)))
  a, b = f(x, w), f(x, w)
  assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_bad_groups_fall_back_or_refuse():
  x = jnp.zeros((1, 8, 8, 6), jnp.float32)
  # 6 channels do not split into 4 groups: lax itself refuses, and so does conv2d (no silent
  # wrong answer from the extension).
  with pytest.raises(Exception):
    onednn.conv2d(x, jnp.zeros((3, 3, 1, 6), jnp.float32), groups=4)


# ---------------------------------------------------------------------------------- the models

def _variables_and_grads(model, x, labels):
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits

  (l, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return variables, l, logits, grads


# Lite0 (the photo backbone: ReLU6, no squeeze-excite) in the default suite; B0's extra
# squeeze-excite and swish add no convolution path, so its twin runs with -m slow.
@pytest.mark.parametrize("name", [pytest.param("efficientnet_tiny", marks=pytest.mark.slow),
                                  "efficientnet_lite_tiny"])
def test_efficientnet_on_onednn_matches_the_xla_model(name):
  """Same parameter tree (so checkpoints and ImageNet weights load unchanged), same loss and
  gradients in train mode. Bound: the chain has D = 3 * blocks + 3 reductions (expand, depthwise,
  project per block; stem, head, classifier), each adding at most gamma_L relative error with
  L <= 2048 (the batch-statistics and weight-gradient sums over N*H*W = 8*16*16), and BatchNorm
  rescales but does not grow relative error to first order, so 2 * D * gamma_2048 of the largest
  magnitude; a mis-wired layer (stride, group mapping, fused activation) is off by O(1)."""
  from jaxclf.models import efficientnet
  from jaxclf.models.registry import create_model
  if name == "efficientnet_lite_tiny":  # Lite: relu6, no SE, k3 + k5, strides, residuals
    make = lambda impl: efficientnet.EfficientNetTiny(num_classes=10, lite=True, conv_impl=impl)
  else:
    make = lambda impl: create_model(name, 10, conv_impl=impl)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  v_ref, l_ref, logits_ref, g_ref = _variables_and_grads(make("xla"), x, labels)
  v, l, logits, g = _variables_and_grads(make("onednn"), x, labels)
  paths = lambda t: [(jax.tree_util.keystr(p), a.shape) for p, a in
                     jax.tree_util.tree_flatten_with_path(t)[0]]
  assert paths(v) == paths(v_ref)
  blocks = sum(1 for k in v["params"] if k.startswith("block"))
  bound = 2 * (3 * blocks + 3) * _gamma(2048)
  rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                           / max(float(np.max(np.abs(np.asarray(b)))), 1e-30))
  assert rel(logits, logits_ref) <= bound
  assert abs(float(l) - float(l_ref)) <= bound * abs(float(l_ref))
  # Gradients against the largest gradient of the model: some are analytically zero (a BatchNorm
  # bias followed by a conv and another train-mode BatchNorm, which subtracts any constant shift),
  # and what they hold is rounding of terms the size of their neighbours'.
  scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)):
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert err <= bound * scale, (jax.tree_util.keystr(path), err, bound * scale)


def test_depthwise_runs_on_onednn_when_the_model_asks_for_it(monkeypatch):
  """conv_impl resolving to 'onednn' routes DepthwiseConv to the extension (not the taps), and
  the old levers stay selectable for benchmarks."""
  from jaxclf.models import efficientnet
  assert efficientnet.resolve_depthwise_impl("onednn") == "onednn"
  assert efficientnet.resolve_depthwise_impl("auto") == "onednn"
  assert efficientnet.resolve_depthwise_impl("xla") == "taps"
  calls = []
  real = onednn.conv2d
  monkeypatch.setattr(onednn, "conv2d", lambda *a, **k: calls.append(k.get("groups")) or real(*a, **k))
  m = efficientnet.DepthwiseConv(3, 1, impl="onednn")
  x = jnp.ones((1, 6, 6, 8), jnp.float32)
  variables = m.init(jax.random.key(0), x)
  calls.clear()
  m.apply(variables, x)
  assert calls == [8]
  with efficientnet.depthwise_impl("taps"):
    assert efficientnet.resolve_depthwise_impl("onednn") == "taps"
  with pytest.raises(ValueError, match="expected one of"):
    with efficientnet.depthwise_impl("fast"):
      pass


def test_onnx_export_of_lite0_keeps_standard_ops():
  """Training runs oneDNN custom calls; the exported graph of the same (Lite) architecture holds
  only standard ONNX ops, with each depthwise conv one grouped Conv."""
  import onnx

  from jaxclf.export.onnx import convert_to_onnx
  from jaxclf.models import efficientnet
  model = efficientnet.EfficientNetTiny(num_classes=10, lite=True)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  proto = convert_to_onnx(lambda inp: model.apply(variables, inp, train=False), (32, 32, 3))
  onnx.checker.check_model(proto)
  domains = {n.domain for n in proto.graph.node}
  assert domains <= {"", "ai.onnx"}, domains
  ops = {n.op_type for n in proto.graph.node}
  assert "Conv" in ops and not any("custom" in o.lower() or "ffi" in o.lower() for o in ops), ops
  grouped = [n for n in proto.graph.node if n.op_type == "Conv"
             and any(a.name == "group" and a.i > 1 for a in n.attribute)]
  assert len(grouped) == sum(1 for k in variables["params"] if k.startswith("block"))


def test_off_cpu_every_layer_stays_on_xla(monkeypatch):
  """conv_impl='auto' on a GPU/TPU backend resolves to XLA for the convs, BatchNorm and the
  depthwise convs (scripts/gpu_check.sh asserts the same on a real GPU: bench/gpu.py
  kernel_selection)."""
  from jaxclf.models import efficientnet, layers
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.resolve_conv_impl("auto") == "xla"
  assert efficientnet.resolve_depthwise_impl("auto") == "xla"
  assert efficientnet.resolve_depthwise_impl("xla") == "xla"
