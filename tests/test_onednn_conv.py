"""jaxclf.ops.onednn.conv2d: forward and both gradients equal lax.conv_general_dilated's (via
jax.vjp) to float32 rounding, under jit, for the anchor-CNN and ResNet shapes, and bit-identical
run to run. The test command builds the extension (scripts/setup.sh, which fails where it cannot):
without it these tests fail, naming onednn.load_error(); they never skip."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxclf.ops import onednn



def _not_built() -> str:
  return (f"the oneDNN conv extension is not built/loadable: {onednn.load_error()} "
          "(bash scripts/setup.sh installs oneDNN and builds it)")


@pytest.fixture
def lib():
  """Without the extension conv2d is lax itself: a comparison with lax would prove nothing."""
  if not onednn.available():
    pytest.fail(_not_built())


needs_lib = pytest.mark.usefixtures("lib")

DIMS = ("NHWC", "HWIO", "NHWC")


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _data(n, hw, cin, cout, k, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, hw, hw, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  return x, w, rng


def _check(n, hw, cin, cout, k, s, padding, forwards=("xla", "onednn")):
  x, w, rng = _data(n, hw, cin, cout, k)
  ref = lambda x, w: lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=DIMS)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  dy = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  dx_ref, dw_ref = vjp_ref(dy)
  for forward in forwards:
    f = jax.jit(lambda x, w, dy: (lambda y, vjp: (y, *vjp(dy)))(*jax.vjp(
        lambda x, w: onednn.conv2d(x, w, strides=(s, s), padding=padding, forward=forward), x, w)))
    y, dx, dw = f(x, w, dy)
    assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == w.shape
    assert _rel(y, y_ref) < 1e-5, f"forward ({forward})"
    assert _rel(dx, dx_ref) < 1e-5, "backward-data"
    assert _rel(dw, dw_ref) < 1e-5, "backward-weights"


def test_the_extension_is_built():
  """The test command installs oneDNN and builds the extension (scripts/setup.sh): it must load,
  whatever the environment says (no CI variable needed)."""
  assert onednn.available(), _not_built()


# (batch, H=W, cin, cout, kernel, stride): the anchor CNN's 3x3 'SAME' layers (small batch: the
# maths does not depend on it) and ResNet's 3x3 / 1x1 stride-2 projections.
SHAPES = [(4, 28, 1, 32, 3, 1), (4, 28, 32, 32, 3, 1), (4, 14, 32, 64, 3, 1),
          (4, 14, 64, 64, 3, 1), (4, 7, 64, 128, 3, 1),
          (4, 16, 16, 32, 3, 2), (4, 16, 16, 32, 1, 2), (2, 8, 128, 256, 3, 2),
          (2, 8, 128, 256, 1, 2), (2, 15, 16, 16, 3, 2)]


@needs_lib
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_{}px_{}x{}_k{}_s{}".format(*s))
def test_matches_lax_same(shape):
  _check(*shape, "SAME")


@needs_lib
@pytest.mark.parametrize("padding", ["VALID", ((2, 0), (1, 3)), ((0, 1), (0, 1))])
def test_matches_lax_valid_and_explicit(padding):
  _check(3, 11, 8, 16, 3, 1, padding)
  _check(3, 11, 8, 16, 3, 2, padding)


@needs_lib
def test_batch_256_weight_gradient():
  """The reduction the train step really does (1->32 at 28 px, 256 images: n = 256 * 28 * 28 =
  200,704 terms a sum) against a float64 reference. Derived bound: a float32 sum of n products of
  random sign has |sum| ~ sqrt(n) * sigma, and summed sequentially (oneDNN does, per thread) each
  partial sum of k terms is rounded by eps/2 * sqrt(k) * sigma; those add up to about
  eps/2 * sigma * n / sqrt(2), i.e. eps / 2 * sqrt(n / 2) = 1.9e-5 of the result. Pairwise or
  blocked sums (XLA) are smaller. The bound is sqrt(n) * eps = 5.3e-5 (eps = 2**-23), above that
  estimate, whatever order or thread count a CPU picks; the worst case n * eps = 2.4e-2 would
  accept garbage. Measured: oneDNN 1.0e-5 (2-core AVX2), XLA 5e-7."""
  x, w, rng = _data(256, 28, 1, 32, 3)
  dy = jnp.asarray(rng.normal(size=(256, 28, 28, 32)), jnp.float32)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  dy64 = np.asarray(dy, np.float64)
  exact = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + 28, j:j + 28], dy64)
                              for j in range(3)]) for i in range(3)])
  xla = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMS),
                w)[1](dy)[0]
  ours = jax.jit(jax.grad(lambda w: jnp.vdot(onednn.conv2d(x, w), dy)))(w)
  bound = np.sqrt(256 * 28 * 28) * 2.0 ** -23
  assert _rel(ours, exact) < bound and _rel(xla, exact) < bound, (_rel(ours, exact),
                                                                   _rel(xla, exact))


@needs_lib
def test_deterministic():
  """Same inputs twice -> bit-identical outputs, for every pass (the kill-9 resume test needs it)."""
  x, w, rng = _data(32, 14, 32, 64, 3, seed=1)
  dy = jnp.asarray(rng.normal(size=(32, 14, 14, 64)), jnp.float32)
  for forward in ("xla", "onednn"):
    f = jax.jit(lambda x, w: jax.vjp(lambda x, w: onednn.conv2d(x, w, forward=forward), x, w))
    runs = []
    for _ in range(2):
      y, vjp = f(x, w)
      runs.append([np.asarray(y), *map(np.asarray, vjp(dy))])
    for a, b in zip(*runs):
      np.testing.assert_array_equal(a, b)


@needs_lib
def test_inside_a_flax_module_train_step():
  """conv2d on a flax `kernel` param: the loss gradient equals nn.Conv's with the same params."""
  import flax.linen as nn

  class Net(nn.Module):
    ours: bool

    @nn.compact
    def __call__(self, x):
      if self.ours:
        k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 8))
        return jnp.mean(jax.nn.relu(onednn.conv2d(x, k)) ** 2)
      return jnp.mean(jax.nn.relu(nn.Conv(8, (3, 3), use_bias=False, name="kernel_holder")(x)) ** 2)

  x, _, _ = _data(4, 10, 3, 8, 3)
  p = Net(True).init(jax.random.key(0), x)["params"]
  g = jax.jit(jax.grad(lambda p: Net(True).apply({"params": p}, x)))(p)["kernel"]
  g_ref = jax.grad(lambda k: Net(False).apply({"params": {"kernel_holder": {"kernel": k}}}, x))(
      p["kernel"])
  assert _rel(g, g_ref) < 1e-5


def test_fallback_is_lax_when_unavailable(monkeypatch):
  """Without the extension conv2d is plain lax (pure JAX), gradients included."""
  monkeypatch.setattr(onednn, "available", lambda: False)
  x, w, rng = _data(2, 9, 4, 8, 3)
  for padding in ("SAME", "VALID", ((1, 0), (0, 2))):
    ref = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=DIMS)
    y, vjp = jax.vjp(lambda x, w: onednn.conv2d(x, w, strides=(2, 2), padding=padding), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    np.testing.assert_array_equal(y, y_ref)
    dy = jnp.ones_like(y)
    for a, b in zip(vjp(dy), vjp_ref(dy)):
      np.testing.assert_array_equal(a, b)


def test_non_float32_uses_lax():
  x, w, _ = _data(2, 8, 4, 8, 3)
  y = onednn.conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 8, 8, 8)


def test_bad_arguments():
  x, w, _ = _data(1, 8, 4, 8, 3)
  with pytest.raises(ValueError):
    onednn.conv2d(x, w, padding="FULL")
  with pytest.raises(ValueError):
    onednn.conv2d(x, w, strides=(1, 1, 1))
