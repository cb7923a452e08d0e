"""The CNN's training levers (jaxclf/models/cnn.py, jaxclf/train/optimizers.py), each on the real
model and the real jitted train step: frozen BatchNorm scales, the 1-d parameters' learning-rate
multiplier, dirac-initialised convs, a scaled head and the frozen patch-whitening stem (fitted on
real Fashion-MNIST images, kept through training and resume). Each exports to ONNX with parity,
and an unknown value is one ConfigError line. Off, each leaves the net and optimizer as before."""
from __future__ import annotations

import functools
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.config import ConfigError, default_config, load_config
from jaxclf.config.validate import validate
from jaxclf.models import whitening
from jaxclf.models.registry import create_model
from jaxclf.train import steps
from jaxclf.train.optimizers import create_optimizer
from jaxclf.train.state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS_F32 = float(np.finfo(np.float32).eps)
SHAPE = (28, 28, 1)
ALL_ON = dict(bn_scale="frozen", conv_init="dirac", head_scale=0.125, stem="whiten")


@pytest.fixture(scope="module")
def fmnist():
  from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
  from jaxclf.data.transforms import PreprocessSpec
  return load_arrays(), PreprocessSpec(class_names=tuple(CLASS_NAMES))


@pytest.fixture(scope="module")
def train_sample(fmnist):
  """512 normalised training images and their labels."""
  from jaxclf.data.transforms import normalize
  (x, y), spec = fmnist[0]["train"], fmnist[1]
  return normalize(x[:512], spec), y[:512]


def config(model_kwargs=None, **optimizer):
  c = default_config()
  c.model.name = "cnn_tiny"
  for k, v in (model_kwargs or {}).items():
    c.model.kwargs[k] = v
  for k, v in optimizer.items():
    c.optimizer[k] = v
  return c


def state_for(c, conv_impl="xla"):
  model = create_model(c.model.name, 10, **dict(c.model.kwargs)).clone(conv_impl=conv_impl)
  return create_train_state(jax.random.key(0), model, SHAPE, create_optimizer(c))


@functools.lru_cache(maxsize=None)
def step_fn():
  return jax.jit(partial(steps.train_step, lr_fn=lambda s: 0.05, label_smoothing=0.0,
                         class_weights=jnp.ones(10), dropout_key=jax.random.key(1)))


def run_steps(state, sample, n):
  x, y = sample
  for i in range(n):
    rows = slice(64 * i, 64 * (i + 1))
    state, _ = step_fn()(state, {"image": jnp.asarray(x[rows]), "label": jnp.asarray(y[rows])})
  return jax.device_get(state)


def leaves(params, name):
  """{path: array} of the params leaves called `name`."""
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
          if str(getattr(p[-1], "key", p[-1])) == name}


# ----------------------------------------------------------------------------- bn_scale, conv_init

@pytest.mark.parametrize("conv_impl", ["xla", "onednn"])
def test_frozen_params_stay_exactly_fixed_while_the_rest_trains(train_sample, conv_impl):
  """Every lever on, through both BatchNorm/conv paths (XLA and oneDNN), weight decay on: after
  real steps the BN scales are exactly 1 and the fitted whitening filters exactly as fitted,
  while the BN shifts and the whitening bias have moved."""
  s0 = state_for(config(ALL_ON, weight_decay=5e-4), conv_impl)
  fitted = whitening.fit_whitening(train_sample[0], 2)
  s0 = s0.replace(params=whitening.set_filters(s0.params, fitted))
  s1 = run_steps(s0, train_sample, 3)
  scales, biases = leaves(s1.params, "scale"), leaves(s1.params, "bias")
  assert len(scales) == 2 and all(np.array_equal(v, np.ones_like(v)) for v in scales.values())
  before = leaves(s0.params, "bias")
  assert len(biases) == 4 and all(not np.array_equal(v, before[k]) for k, v in biases.items())
  np.testing.assert_array_equal(s1.params["whiten"]["kernel"], fitted)
  if conv_impl == "xla":  # the same steps with learned scales do move them
    learned = run_steps(state_for(config(), conv_impl), train_sample, 3)
    assert all(not np.array_equal(v, 1.0) for v in leaves(learned.params, "scale").values())


def test_dirac_convs_pass_their_first_channels_through_at_init():
  from jaxclf.models.layers import conv2d
  kw = dict(layers=(8, 8, "M", 16, 4), weight_init="torch")
  init = lambda m: jax.jit(partial(m.init, train=False))(jax.random.key(0),
                                                        jnp.zeros((1, *SHAPE)))["params"]
  params = init(create_model("cnn", 10, conv_init="dirac", **kw))
  plain = init(create_model("cnn", 10, **kw))
  x = jax.random.normal(jax.random.key(1), (2, 14, 14, 16))
  convs = sorted(k for k in params if k.startswith("Conv_"))
  assert convs == ["Conv_0", "Conv_1", "Conv_2"]  # the stem (StemConv_0) keeps weight_init
  np.testing.assert_array_equal(params["StemConv_0"]["kernel"], plain["StemConv_0"]["kernel"])
  for name in convs:
    kernel = params[name]["kernel"]
    cin, cout = kernel.shape[2:]
    n = min(cin, cout)
    y = conv2d(x[..., :cin], kernel, impl="xla")
    np.testing.assert_array_equal(y[..., :n], x[..., :n])  # exactly: one 1, the rest zeros
    np.testing.assert_array_equal(kernel[..., n:], plain[name]["kernel"][..., n:])


def test_head_scale_multiplies_the_logits():
  x = jax.random.normal(jax.random.key(1), (4, *SHAPE))
  plain = create_model("cnn_tiny", 10)
  variables = jax.jit(partial(plain.init, train=False))(jax.random.key(0), x[:1])
  scaled = create_model("cnn_tiny", 10, head_scale=0.125)
  logits = lambda m: jax.jit(m.apply)(variables, x)
  # A power of two: the product is exact, so equality is exact.
  np.testing.assert_array_equal(logits(scaled), 0.125 * logits(plain))


# ----------------------------------------------------------------------------- bias_lr_mult

def _one_sgd_step(c, sample):
  s0 = state_for(c)
  return jax.device_get(s0.params), run_steps(s0, sample, 1).params


@pytest.mark.parametrize("grouped", [False, True])
def test_bias_lr_mult_scales_exactly_the_updates_of_1d_params(train_sample, grouped):
  """One SGD step without momentum: each 1-d parameter moves mult x what it moves at 1.0;
  every kernel moves exactly as at 1.0 (weight decay on: kernels only)."""
  mult = 3.0
  opt = dict(momentum=0.0, nesterov=False, weight_decay=5e-4,
             lr_mults="backbone=0.5" if grouped else "")
  p0, p1 = _one_sgd_step(config(**opt), train_sample)
  _, pm = _one_sgd_step(config(**opt, bias_lr_mult=mult), train_sample)
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v, np.float64)
                    for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  p0, p1, pm = flat(p0), flat(p1), flat(pm)
  n_bias = 0
  for k in p0:
    if p0[k].ndim > 1:
      np.testing.assert_array_equal(pm[k], p1[k], err_msg=k)
      continue
    n_bias += 1
    d1, dm = p1[k] - p0[k], pm[k] - p0[k]
    # float32: the update -lr*mult*g is rounded (2 roundings: lr*mult, then *g), and so is each
    # p0 + update (half an ulp of the result, at most eps*|p|); the differences here are exact.
    tol = EPS_F32 * (2 * np.abs(dm) + np.abs(pm[k]) + mult * np.abs(p1[k]))
    assert np.all(np.abs(dm - mult * d1) <= tol), k
    assert np.any(d1 != 0), k
  assert n_bias == 5  # 2 BN scales, 2 BN biases, the classifier's bias


def test_the_default_optimizer_and_net_are_the_plain_ones():
  """All levers at their defaults, spelled out or not: the same plain optimizer state (no
  partition) and the same parameter tree as the net without the levers."""
  spelled = config(dict(bn_scale="learned", conv_init="default", head_scale=1.0, stem="conv"),
                   bias_lr_mult=1.0)
  a, b = state_for(config()), state_for(spelled)
  assert jax.tree.structure(a.opt_state) == jax.tree.structure(b.opt_state)
  assert "inner_states" not in str(jax.tree.structure(a.opt_state))
  assert {k: v.shape for k, v in leaves(a.params, "kernel").items()} == {
      "['StemConv_0']['kernel']": (3, 3, 1, 8), "['Conv_0']['kernel']": (3, 3, 8, 16),
      "['Dense_0']['kernel']": (784, 10)}
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


# ----------------------------------------------------------------------------- whitening

@pytest.mark.parametrize("kernel", [2, 3])
def test_whitened_patches_have_identity_covariance(train_sample, kernel):
  eps = 5e-4
  x = train_sample[0]
  filters = whitening.fit_whitening(x, kernel, eps)
  d = kernel * kernel
  assert filters.shape == (kernel, kernel, 1, 2 * d)
  y = whitening.Whiten(kernel).apply({"params": {"kernel": filters, "bias": np.zeros(2 * d)}},
                                     jnp.asarray(x))
  y = np.asarray(y, np.float64).reshape(-1, 2 * d)
  lam = np.sort(np.linalg.eigvalsh(whitening.patches(x, kernel).T @ whitening.patches(x, kernel)
                                   / len(y)))[::-1]
  # Exactly, each half's covariance is diag(lam / (lam + eps)): the identity to eps / (lam + eps).
  # float32: a filter output sums d products; each output's rounding is <= d*eps32*|w||p| with
  # |w| = 1/sqrt(lam + eps) and E|p|^2 = sum(lam), so a covariance entry moves by at most twice
  # that over the output's own scale (~1); x4 covers the float32-rounded filters too.
  tol = eps / (lam + eps) + 4 * d * EPS_F32 * np.sqrt(lam.sum() / (lam + eps))
  for half in (y[:, :d], y[:, d:]):
    cov = half.T @ half / len(half)
    bound = np.sqrt(np.outer(tol, tol))
    assert np.all(np.abs(cov - np.eye(d)) <= bound), np.abs(cov - np.eye(d)).max()
  assert tol.max() < 0.05  # the check is meaningful: the identity to a few percent at worst
  np.testing.assert_array_equal(y[:, :d], -y[:, d:])


def tiny_config(overrides=()):
  return load_config(f"{ROOT}/configs/cnn.py:tiny", environ={},
                     overrides=["model.kwargs.stem=whiten", "model.kwargs.whiten_kernel=3",
                                "evals.test.enabled=false", "train.calibrate=false",
                                "train.tta_flip=false", *overrides])


def test_the_trainer_fits_the_stem_once_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
  """The tiny config with the whitening stem: the filters fitted on the training split's images
  at the fresh start are those of the finished, resumed run, bit for bit."""
  from jaxclf.data.dataset import load_dataset
  from jaxclf.train.checkpoints import load_inference
  from jaxclf.train.loop import create_preprocess_spec, train_and_evaluate
  from jaxclf.train.whitening_init import training_sample
  train_and_evaluate(tiny_config(["train.max_steps=8"]), str(tmp_path))  # fits, trains, saves
  with monkeypatch.context() as m:  # the resumed segment restores the filters: no fit
    m.setattr(whitening, "fit_whitening", lambda *a, **k: pytest.fail("refitted on resume"))
    record = train_and_evaluate(tiny_config(), str(tmp_path))  # resumes at step 8, runs to 16
  assert record["resumed_from_step"] == 8, record.keys()
  c = tiny_config()
  dataset = load_dataset(c.data)
  sample = training_sample(dataset.split("train"), create_preprocess_spec(c, dataset.class_names),
                           c)
  assert sample.shape == (512, *SHAPE)  # the tiny split, all of it (under the 5,000 bound)
  latest = load_inference(str(tmp_path), "latest")
  assert latest.step == 16
  params = latest.variables["params"]
  np.testing.assert_array_equal(params["whiten"]["kernel"], whitening.fit_whitening(sample, 3))
  assert not np.array_equal(params["whiten"]["bias"], 0.0)


def test_the_fit_sample_is_the_same_from_memory_and_from_grain(fmnist):
  from jaxclf.data.dataset import SubsetSource
  from jaxclf.data.types import ArraySource, Split
  from jaxclf.train.whitening_init import training_sample
  (x, y), spec = fmnist[0]["train"], fmnist[1]
  source = ArraySource(x[:300], y[:300])
  memory = training_sample(Split(source, y[:300]), spec, default_config(), n=200)
  decoded = Split(SubsetSource(source, np.arange(300)), y[:300])  # not an array: Grain decodes
  grain = training_sample(decoded, spec, default_config(), n=200)
  assert memory.shape == (200, *SHAPE)
  np.testing.assert_array_equal(memory, grain)


# ----------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("key,value,match", [
    ("bn_scale", "fixed", r"model\.kwargs\.bn_scale: 'fixed' is not one of "
                          r"\['learned', 'frozen'\]"),
    ("conv_init", "identity", r"model\.kwargs\.conv_init: 'identity' is not one of "
                              r"\['default', 'dirac'\]"),
    ("stem", "whitening", r"model\.kwargs\.stem: 'whitening' is not one of \['conv', 'whiten'\]"),
    ("head_scale", 0.0, r"model\.kwargs\.head_scale: 0\.0 is not a number in \(0\.0, 1000\.0\]"),
    ("whiten_kernel", 2.5, r"model\.kwargs\.whiten_kernel: 2\.5 is not an integer in \[1, 7\]"),
    ("whiten_eps", -1.0, r"model\.kwargs\.whiten_eps: -1\.0 is not a number"),
])
def test_bad_lever_values_are_one_config_error_each(key, value, match):
  with pytest.raises(ConfigError, match=match):
    validate(config({key: value}))


def test_bad_bias_lr_mult_is_a_config_error():
  with pytest.raises(ConfigError, match=r"optimizer\.bias_lr_mult: -1\.0 is out of range"):
    validate(config(bias_lr_mult=-1.0))


def test_the_model_itself_names_a_bad_value():
  with pytest.raises(ValueError, match=r"model\.kwargs\.stem='x': use one of \['conv', 'whiten'\]"):
    create_model("cnn_tiny", 10, stem="x").init(jax.random.key(0), jnp.zeros((1, *SHAPE)))


# ----------------------------------------------------------------------------- ONNX export

@pytest.mark.parametrize("kwargs", [ALL_ON, {**ALL_ON, "whiten_kernel": 3}, {"bn_scale": "frozen"},
                                    {"conv_init": "dirac"}, {"head_scale": 1 / 9}],
                         ids=["all", "all_k3", "bn_scale", "conv_init", "head_scale"])
def test_levers_export_to_standard_onnx_with_parity(fmnist, train_sample, tmp_path, kwargs):
  import onnx

  from jaxclf.export.onnx import export_model, full_parity, graph_op_types, ort_session
  from jaxclf.data.transforms import preprocess_batch
  arrays, spec = fmnist
  c = config(kwargs)
  state = state_for(c)
  if kwargs.get("stem") == "whiten":
    filters = whitening.fit_whitening(train_sample[0], kwargs.get("whiten_kernel", 2))
    state = state.replace(params=whitening.set_filters(state.params, filters))
  if "stem" in kwargs:  # moved BN statistics and biases (the single levers keep their init)
    state = run_steps(state, train_sample, 2)
  model = create_model("cnn_tiny", 10, **kwargs)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  result = export_model(model, variables, spec, str(tmp_path / "x"), model_name="cnn_tiny",
                        parity_images=list(arrays["test"][0][:64]))
  path = os.path.join(result.out_dir, "model.onnx")
  proto = onnx.load(path)
  assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node) and not proto.functions
  ops = graph_op_types(proto)
  assert "Conv" in ops and ("Mul" in ops or "head_scale" not in kwargs), ops
  assert result.parity["passed"]  # batches 1, 7 and 64 within 1e-4 (export_model checks)
  if kwargs == ALL_ON:  # and the whole test set for the combined levers
    x = preprocess_batch(list(arrays["test"][0]), spec)
    apply = jax.jit(lambda b: model.apply(variables, b, train=False))
    report = full_parity(lambda b: np.asarray(apply(b)), ort_session(path), x)
    assert report["count"] == 10_000
    assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
