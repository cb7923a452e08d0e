"""Where EfficientNet-Lite0's train step spends its time on CPU, lever by lever, in one run: the
photo path (configs/photos.py: RGB, `--size` px) or the grey transfer path (--config transfer).

  .venv/bin/python bench/lite0_step.py --size 128 --out docs/results/lite0_step.json
  .venv/bin/python bench/lite0_step.py --config transfer --size 64     # the grey 64 px recipe

Rows (ms per call, images/s; synthetic data, after warm-up, one process, same batch):
  cnn_step               configs/cnn.py's net at its batch, 28x28x1: a yardstick for the machine
  lite0_step[before]     every conv by XLA (conv_impl=xla), depthwise as taps, BatchNorm in XLA:
                         what the trainer ran before the oneDNN depthwise kernel
  lite0_step[dw=xla]     conv_impl=auto (1x1/stem/BN on oneDNN), depthwise by XLA's grouped conv
  lite0_step[dw=taps]    ... depthwise as k*k taps (efficientnet.depthwise_taps)
  lite0_step[bn=xla]     ... depthwise on oneDNN, BatchNorm's training pass in XLA
  lite0_step             what the trainer runs now: conv_impl=auto, everything on oneDNN
  lite0_frozen_step      the frozen phase's step (inference-mode backbone, its gradients dropped)
  lite0_features         backbone forward once (what the feature cache costs per batch)
  lite0_head_step        the cached phase's step: the head on cached 1280-d features
  convs                  every convolution of Lite0's forward on its real shapes, forward +
                         backward (input and kernel gradients), summed by kind (depthwise k3/k5,
                         1x1, stem), by lax's conv and by jaxclf.ops.onednn, beside the taps
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import emit  # noqa: E402
from step_profile import timed  # noqa: E402
from jaxclf.config import load_config  # noqa: E402
from jaxclf.models import create_model, efficientnet, layers  # noqa: E402
from jaxclf.ops import onednn  # noqa: E402
from jaxclf.models.layers import resolve_conv_impl  # noqa: E402
from jaxclf.train import finetune, steps  # noqa: E402
from jaxclf.train.optimizers import create_optimizer  # noqa: E402
from jaxclf.train.state import create_train_state  # noqa: E402


def _state_and_step(config, batch_size, **step_kw):
  model = create_model(config.model.name, 10, **dict(config.model.kwargs))
  if hasattr(model, "conv_impl"):
    model = model.clone(conv_impl=resolve_conv_impl(config.model.conv_impl))
  size, ch = int(config.preprocessing.image_size), int(config.data.channels)
  state = create_train_state(jax.random.key(0), model, (size, size, ch), create_optimizer(config))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, size, size, ch)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  kw = dict(lr_fn=lambda s: 0.01, label_smoothing=0.1, class_weights=jnp.ones(10),
            dropout_key=jax.random.key(1))
  step = jax.jit(partial(steps.train_step, **kw, **step_kw), donate_argnums=(0,))
  return model, state, batch, step, kw


def fresh(state):
  """A copy of `state` for a donating step (each timed row consumes its own)."""
  return jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, state)


def conv_calls(model, variables, x):
  """(name, input shape, kernel shape, strides, groups) of every nn.Conv in the forward."""
  calls = []

  def intercept(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, efficientnet.DepthwiseConv) and context.method_name == "__call__":
      k = variables["params"]
      for name in m.path:
        k = k[name]
      calls.append(("/".join(m.path), tuple(args[0].shape), tuple(k["kernel"].shape),
                    (m.stride, m.stride), int(args[0].shape[-1]), "SAME"))
    elif isinstance(m, (nn.Conv, layers.Conv)) and context.method_name == "__call__":
      k = variables["params"]
      for name in m.path:
        k = k[name]
      strides = m.strides or 1
      strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
      calls.append(("/".join(m.path), tuple(args[0].shape), tuple(k["kernel"].shape),
                    strides, int(getattr(m, "feature_group_count", 1)), m.padding))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda: model.apply(variables, x, train=False))
  return calls


def _kind(name, kernel, groups):
  if "stem" in name:
    return "stem"
  if groups > 1:
    return f"depthwise_k{kernel[0]}"
  return "1x1" if kernel[0] == 1 else f"dense_k{kernel[0]}"


def _conv_fn(strides, groups, padding, impl):
  if impl == "onednn":
    return lambda x, k: onednn.conv2d(x, k, strides=strides, padding=padding, groups=groups)
  def f(x, k):
    return jax.lax.conv_general_dilated(x, k, strides, padding, feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return f


def conv_breakdown(calls, min_time):
  """{impl: {kind: ms}} for impl in lax / onednn (fwd + both grads), and the taps' total."""
  by_kind, taps = {"lax": defaultdict(float), "onednn": defaultdict(float)}, 0.0
  rng = np.random.default_rng(0)
  for name, xs, ks, strides, groups, padding in calls:
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    k = jnp.asarray(rng.normal(size=ks), jnp.float32)
    for impl in by_kind:
      f = _conv_fn(strides, groups, padding, impl)
      fb = jax.jit(jax.value_and_grad(lambda x, k, f=f: f(x, k).sum(), argnums=(0, 1)))
      by_kind[impl][_kind(name, ks, groups)] += timed(fb, x, k, min_time=min_time)
    if groups > 1:
      tb = jax.jit(jax.value_and_grad(
          lambda x, k, s=strides[0]: efficientnet.depthwise_taps(x, k, s).sum(), argnums=(0, 1)))
      taps += timed(tb, x, k, min_time=min_time)
  return {impl: dict(v) for impl, v in by_kind.items()}, taps


def _variant(config, batch, state, conv_impl="auto", dw="auto", bn="auto", min_time=2.0):
  """ms of one train step with the given levers (each traced afresh)."""
  efficientnet.DEPTHWISE_IMPL, efficientnet.BATCHNORM_IMPL = dw, bn
  try:
    c = config.copy_and_resolve_references()
    c.model.conv_impl = conv_impl
    _, _, batch_, step, _ = _state_and_step(c, batch)
    return timed(step, fresh(state), batch_, min_time=min_time, donate_state=True)
  finally:
    efficientnet.DEPTHWISE_IMPL, efficientnet.BATCHNORM_IMPL = "auto", "auto"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32, help="Lite0 batch")
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--config", choices=("photos", "transfer"), default="photos")
  p.add_argument("--min-time", type=float, default=2.0)
  p.add_argument("--skip-convs", action="store_true", help="no per-conv breakdown (faster)")
  p.add_argument("--out", default="docs/results/lite0_step.json")
  a = p.parse_args()
  res = {"host_cpus": os.cpu_count(), "batch": a.batch, "size": a.size, "config": a.config,
         "onednn": onednn.available(), "load_avg_start": os.getloadavg(), "rows": {}}

  def row(name, ms, n):
    res["rows"][name] = {"ms": round(ms, 2), "images_per_s": round(1000 * n / ms, 1)}

  cnn = load_config(f"{ROOT}/configs/cnn.py:anchor", environ={})
  _, state, batch, step, _ = _state_and_step(cnn, 128)
  row("cnn_step", timed(step, state, batch, min_time=a.min_time, donate_state=True), 128)

  arg = f"size={a.size}" if a.config == "photos" else None
  lite = load_config(f"{ROOT}/configs/{a.config}.py" + (f":{arg}" if arg else ""), environ={},
                     overrides=[] if arg else [f"preprocessing.image_size={a.size}"])
  model, state, batch, step, kw = _state_and_step(lite, a.batch)
  calls = conv_calls(model, {"params": state.params, "batch_stats": state.batch_stats},
                     batch["image"])
  variants = {"lite0_step[before]": dict(conv_impl="xla", dw="taps", bn="xla"),
              "lite0_step[dw=xla]": dict(dw="xla"), "lite0_step[dw=taps]": dict(dw="taps"),
              "lite0_step[bn=xla]": dict(bn="xla"), "lite0_step": {}}
  for name, levers in variants.items():
    row(name, _variant(lite, a.batch, state, min_time=a.min_time, **levers), a.batch)
  mask = finetune.backbone_mask("efficientnet_lite0", state.params)
  frozen = jax.jit(partial(steps.train_step, **kw, frozen_backbone=mask), donate_argnums=(0,))
  row("lite0_frozen_step",
      timed(frozen, fresh(state), batch, min_time=a.min_time, donate_state=True), a.batch)
  feats = finetune.create_feature_fn(state.apply_fn, "classifier")
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  row("lite0_features", timed(feats, variables, batch, min_time=a.min_time), a.batch)
  fb = {"features": feats(variables, batch), "label": batch["label"]}
  head = jax.jit(partial(steps.train_step, **kw, frozen_backbone=mask,
                         head_forward=finetune.create_head_forward(model, "classifier")),
                 donate_argnums=(0,))
  row("lite0_head_step",
      timed(head, fresh(state), fb, min_time=a.min_time, donate_state=True), a.batch)

  if not a.skip_convs:
    kinds, taps = conv_breakdown(calls, a.min_time / 4)
    step_ms = res["rows"]["lite0_step"]["ms"]
    res["convs"] = {impl: {k: {"ms": round(v, 2), "share_of_step": round(v / step_ms, 3)}
                           for k, v in sorted(by.items())} for impl, by in kinds.items()}
    dw = sum(v for k, v in kinds["lax"].items() if k.startswith("depthwise"))
    res["depthwise_taps"] = {"ms": round(taps, 2), "vs_lax_depthwise": round(taps / dw, 3)}
  res["n_convs"] = len(calls)
  res["load_avg_end"] = os.getloadavg()
  emit(res, a.out)


if __name__ == "__main__":
  main()
