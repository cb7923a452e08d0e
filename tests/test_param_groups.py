"""Fine-tuning optimizers: param groups by architecture, discriminative learning rates, layer-wise
decay and an exactly frozen backbone, on real models and the real jitted step."""
from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclf.config.defaults import default_config
from jaxclf.models import param_groups
from jaxclf.models.registry import create_model
from jaxclf.train import steps
from jaxclf.config.names import parse_lr_mults
from jaxclf.train.optimizers import create_optimizer
from jaxclf.train.state import create_train_state


def config(model="cnn_tiny", **optimizer):
  c = default_config()
  c.model.name = model
  c.optimizer.weight_decay = 5e-4
  for k, v in optimizer.items():
    c.optimizer[k] = v
  return c


def state_for(c, shape=(16, 16, 1)):
  model = create_model(c.model.name, 10)
  return create_train_state(jax.random.key(0), model, shape, create_optimizer(c))


def batch(seed=0, shape=(16, 16, 1)):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(8, *shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}


@functools.lru_cache(maxsize=None)
def step_fn(freeze_steps=0):
  return jax.jit(partial(steps.train_step, lr_fn=lambda s: 0.1, label_smoothing=0.0,
                         class_weights=jnp.ones(10), dropout_key=jax.random.key(1),
                         freeze_backbone_steps=freeze_steps))


def split(params, model):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return ({jax.tree_util.keystr(p): np.asarray(v) for p, v in flat
           if param_groups.group_of(model, p) == g} for g in ("backbone", "head"))


@pytest.mark.parametrize("model,head", [("cnn", {"Dense_0"}), ("resnet18", {"Dense_0"}),
                                        ("vgg11", {"Dense_0"}),
                                        ("efficientnet_lite0", {"classifier"})])
def test_the_head_is_the_classifier_of_each_architecture(model, head):
  m = create_model(model, 10)
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))["params"]
  labels = param_groups.labels(model)(params)
  assert {k for k, sub in labels.items() if set(jax.tree.leaves(sub)) == {"head"}} == head
  assert {k for k, sub in labels.items() if set(jax.tree.leaves(sub)) == {"backbone"}} == \
      set(params) - head


def test_a_frozen_backbone_is_bit_identical_then_trains_after_unfreezing():
  c = config(lr_mults="backbone=0.1")
  c.train.freeze_backbone_epochs = 1  # makes the optimizer grouped; the step gets the steps
  s0 = state_for(c)
  s = s0
  for i in range(2):  # 2 frozen steps
    s, _ = step_fn(2)(s, batch(i))
  bb0, head0 = split(s0.params, "cnn_tiny")
  bb2, head2 = split(s.params, "cnn_tiny")
  assert all(np.array_equal(bb0[k], bb2[k]) for k in bb0)  # weight decay too: exactly frozen
  assert any(not np.array_equal(head0[k], head2[k]) for k in head0)
  s, _ = step_fn(2)(s, batch(2))  # step 3: unfrozen
  bb3, _ = split(s.params, "cnn_tiny")
  assert all(not np.array_equal(bb2[k], bb3[k]) for k in bb2 if k.endswith("kernel']"))


def test_backbone_multiplier_scales_its_updates():
  plain, slow = config(momentum=0.0, weight_decay=0.0), \
      config(momentum=0.0, weight_decay=0.0, lr_mults="backbone=0.1,head=1")
  s_plain, s_slow = state_for(plain), state_for(slow)
  p1, _ = step_fn()(s_plain, batch())
  q1, _ = step_fn()(s_slow, batch())
  bb0, h0 = split(s_plain.params, "cnn_tiny")
  (bbp, hp), (bbq, hq) = split(p1.params, "cnn_tiny"), split(q1.params, "cnn_tiny")
  for k in bb0:
    np.testing.assert_allclose(bbq[k] - bb0[k], 0.1 * (bbp[k] - bb0[k]), rtol=1e-4, atol=1e-7)
  for k in h0:
    np.testing.assert_allclose(hq[k], hp[k], rtol=1e-6, atol=1e-7)


def test_layer_decay_scales_the_stem_most():
  c = config("resnet_tiny", momentum=0.0, weight_decay=0.0, layer_decay=0.5)
  flat = config("resnet_tiny", momentum=0.0, weight_decay=0.0)
  shape = (16, 16, 3)
  s, f = state_for(c, shape), state_for(flat, shape)
  s1, _ = step_fn()(s, batch(shape=shape))
  f1, _ = step_fn()(f, batch(shape=shape))
  levels, head = param_groups.layer_levels("resnet_tiny", s.params)
  ratio = jax.tree.map(lambda a, b, c0: float(jnp.abs(a - c0).sum() / jnp.abs(b - c0).sum()),
                       s1.params, f1.params, s.params)
  for (path, r), lv in zip(jax.tree_util.tree_flatten_with_path(ratio)[0], jax.tree.leaves(levels)):
    if not np.isnan(r):
      assert r == pytest.approx(0.5 ** (head - lv), rel=1e-3), jax.tree_util.keystr(path)
  assert jax.tree.leaves(levels) and min(jax.tree.leaves(levels)) == 0


def test_bad_fine_tuning_settings_name_the_field():
  with pytest.raises(ValueError, match="unknown param group 'neck'"):
    parse_lr_mults("neck=0.1")
  with pytest.raises(ValueError, match="is not group=multiplier"):
    parse_lr_mults("backbone")
  with pytest.raises(ValueError, match="model 'cnn_tiny' declares no layer order"):
    create_optimizer(config(layer_decay=0.8))
  # and before any compute, through config validation, naming the field
  from jaxclf.config import validate
  from jaxclf.config.validate import ConfigError
  with pytest.raises(ConfigError, match="unknown param group 'neck'"):
    validate(config(lr_mults="neck=0.1"))
  with pytest.raises(ConfigError, match="optimizer.layer_decay: model 'cnn_tiny'"):
    validate(config(layer_decay=0.8))
  validate(config("resnet18", layer_decay=0.8, lr_mults="backbone=0.1"))


def test_freeze_batchnorm_keeps_the_running_statistics_while_everything_trains():
  """train.freeze_batchnorm: the ordinary (unfrozen) step normalises with the running statistics
  and leaves them bit-identical, while every kernel trains; without it the statistics move."""
  shape = (16, 16, 1)
  s0 = state_for(config("cnn_tiny"), shape)  # BatchNorm after each conv
  args = dict(lr_fn=lambda s: 0.1, label_smoothing=0.0, class_weights=jnp.ones(10),
              dropout_key=jax.random.key(1))
  b = batch(0, shape)
  frozen_bn = jax.jit(partial(steps.train_step, **args, freeze_batchnorm=True))(s0, b)[0]
  ordinary = jax.jit(partial(steps.train_step, **args))(s0, b)[0]
  stats0, stats_f, stats_o = (jax.tree.leaves(s.batch_stats) for s in (s0, frozen_bn, ordinary))
  assert stats0 and all(np.array_equal(a, b) for a, b in zip(stats0, stats_f))
  assert all(not np.array_equal(a, b) for a, b in zip(stats0, stats_o))
  kernels = [(p, a, b) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(s0.params)[0],
                                            jax.tree.leaves(frozen_bn.params))
             if jax.tree_util.keystr(p).endswith("['kernel']")]
  assert kernels and all(not np.array_equal(a, b) for _, a, b in kernels)
