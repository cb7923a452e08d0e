"""Train-step time and throughput on whatever accelerator JAX sees (run by scripts/gpu_check.sh).

Synthetic batches of the real shape, the real jitted train step (jaxclf.train.steps.train_step,
SGD-Nesterov + label smoothing as configs/cnn.py), warm-up excluded, device-resident inputs so
the number is the step itself; a second figure includes the host->device copy of each batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxclf.config import default_config  # noqa: E402
from jaxclf.models import create_model  # noqa: E402
from jaxclf.train import steps  # noqa: E402
from jaxclf.train.optimizers import create_optimizer  # noqa: E402
from jaxclf.train.schedules import create_learning_rate_fn  # noqa: E402
from jaxclf.train.state import count_params, create_train_state  # noqa: E402

CASES = [("cnn", {}, 1024, "float32"), ("cnn", {}, 1024, "bfloat16"),
         ("resnet18", {"stem": "small"}, 512, "float32"), ("resnet18", {"stem": "small"}, 512, "bfloat16")]


def measure(name, kwargs, batch, dtype, steps_n):
  c = default_config()
  kw = dict(kwargs)
  if dtype != "float32":
    kw["dtype"] = getattr(jnp, dtype)
  model = create_model(name, 10, **kw)
  state = create_train_state(jax.random.key(0), model, (28, 28, 1), create_optimizer(c))
  step = jax.jit(partial(steps.train_step, lr_fn=create_learning_rate_fn(c, 100, 1000),
                         label_smoothing=0.1, class_weights=jnp.ones(10),
                         dropout_key=jax.random.key(1)), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  host = {"image": rng.normal(size=(batch, 28, 28, 1)).astype(np.float32),
          "label": rng.integers(0, 10, batch).astype(np.int32)}
  dev = jax.device_put(host)
  t = time.time()
  state, m = step(state, dev)
  jax.block_until_ready(state)
  compile_s = time.time() - t
  for _ in range(5):
    state, m = step(state, dev)
  jax.block_until_ready(state)
  t = time.time()
  for _ in range(steps_n):
    state, m = step(state, dev)
  jax.block_until_ready(state)
  dt = (time.time() - t) / steps_n
  t = time.time()
  for _ in range(steps_n):
    state, m = step(state, jax.device_put(host))
  jax.block_until_ready(state)
  dt_h2d = (time.time() - t) / steps_n
  return {"model": name, "dtype": dtype, "batch": batch, "params": count_params(state.params),
          "compile_s": round(compile_s, 2), "step_ms": round(dt * 1000, 3),
          "images_per_sec": round(batch / dt), "images_per_sec_with_h2d": round(batch / dt_h2d)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--out", default="bench/results/gpu_check.json")
  a = p.parse_args()
  res = {"jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()], "cases": []}
  for case in CASES:
    res["cases"].append(measure(*case, a.steps))
    print(json.dumps(res["cases"][-1]), flush=True)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
