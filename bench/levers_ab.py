"""A/B of the CPU kernel levers inside one process: the default CNN's jitted train step with
BatchNorm and max pool on XLA or on oneDNN (the convolutions on oneDNN in every variant), timed in
alternating short blocks so that background load hits every variant alike. Prints JSON.

  .venv/bin/python bench/levers_ab.py                          # 12 rounds of 3 steps per variant
  .venv/bin/python bench/levers_ab.py --rounds 20 --out docs/results/levers_ab.json

Variants (every one is the same maths; tests/test_layers.py checks it):
  conv_only   conv forward/backward on oneDNN; BatchNorm (hand-written backward) and pool in XLA
  pool        + max pool on oneDNN (argmax workspace)
  bn_pool     + BatchNorm on oneDNN, with the ReLU fused (the default when the extension is built)
The per-round speedups over conv_only are paired (same round, same load), so their median is a
steadier figure than a ratio of means on a shared machine. Baseline in the same run: conv_only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from _common import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _xla_batch_norm(x, scale, shift, *, epsilon=1e-5, relu=False):
  from jaxclf.models import layers
  y, mean, var = layers._bn_train(x, scale, shift, epsilon)
  return (jax.nn.relu(y) if relu else y), mean, var


def build_variants(batch: int):
  """{name: (jitted step, state)}; each variant is traced with its kernels swapped in."""
  from jaxclf.config import load_config
  from jaxclf.models import create_model
  from jaxclf.ops import onednn
  from jaxclf.train import steps
  from jaxclf.train.optimizers import create_optimizer
  from jaxclf.train.schedules import create_learning_rate_fn
  from jaxclf.train.state import create_train_state
  if not onednn.available():
    raise SystemExit(f"levers_ab: the oneDNN extension is not available ({onednn.load_error()})")
  c = load_config(os.path.join(ROOT, "configs/cnn.py:anchor"), environ={})
  model = create_model("cnn", 10, layers=tuple(c.model.kwargs.layers), conv_impl="onednn")
  lr_fn = create_learning_rate_fn(c, 100, 1000)
  rng = np.random.default_rng(0)
  b = {"image": rng.normal(size=(batch, 28, 28, 1)).astype(np.float32),
       "label": rng.integers(0, 10, batch).astype(np.int32)}
  real_bn = onednn.batch_norm_train
  variants = {}
  for name, norm_pool, bn in (("conv_only", False, real_bn), ("pool", True, _xla_batch_norm),
                              ("bn_pool", True, real_bn)):
    onednn._NORM_POOL, onednn.batch_norm_train = norm_pool, bn
    try:
      state = create_train_state(jax.random.key(0), model, (28, 28, 1), create_optimizer(c))
      step = jax.jit(partial(steps.train_step, lr_fn=lr_fn, label_smoothing=0.1,
                             class_weights=jnp.ones(10), dropout_key=jax.random.key(1)),
                     donate_argnums=(0,))
      for _ in range(2):  # compile (tracing happens here, with this variant's kernels) + warm up
        state, _ = step(state, b)
      jax.block_until_ready(state)
    finally:
      onednn._NORM_POOL, onednn.batch_norm_train = True, real_bn
    variants[name] = [step, state]
  return variants, b


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=12)
  p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--out", default="docs/results/levers_ab.json")
  a = p.parse_args()
  load_start = os.getloadavg()
  variants, b = build_variants(a.batch)
  ms = {k: [] for k in variants}
  for _ in range(a.rounds):
    for name, v in variants.items():
      t = time.perf_counter()
      for _ in range(a.steps):
        v[1], _m = v[0](v[1], b)
      jax.block_until_ready(v[1])
      ms[name].append(1000 * (time.perf_counter() - t) / a.steps)
  result = {"bench": "levers_ab", "batch": a.batch, "rounds": a.rounds, "steps": a.steps,
            "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "step_ms": {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1)}
                        for k, v in ms.items()},
            "images_per_sec_median": {k: round(a.batch * 1000 / statistics.median(v), 1)
                                      for k, v in ms.items()}}
  result["speedup_over_conv_only"] = {
      k: {"median_of_paired": round(statistics.median(
          x / y for x, y in zip(ms["conv_only"], ms[k])), 3),
          "of_min": round(min(ms["conv_only"]) / min(ms[k]), 3)}
      for k in ms if k != "conv_only"}
  emit(result, a.out)


if __name__ == "__main__":
  main()
