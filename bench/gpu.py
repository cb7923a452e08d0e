"""Train-step time and throughput on whatever accelerator JAX sees (run by scripts/gpu_check.sh).

Synthetic batches of the real shape, the real jitted train step (jaxclf.train.steps.train_step,
SGD-Nesterov + label smoothing as configs/cnn.py), warm-up excluded, device-resident inputs so
the number is the step itself; a second figure includes the host->device copy of each batch.

`data_parallel` cases: the trainer's data-parallel path (jaxclf/train/loop.py) on a mesh of the
one GPU: the state replicated and each batch assembled by jaxclf.train.distributed, the step
jitted with the loop's shardings, float32 and bfloat16 (model.dtype), with and without
train.grad_accum_steps; each reports its step time and that its loss fell and stayed finite.
(The multi-device mesh itself is proven on CPU with simulated devices:
tests/test_distributed_trainer.py.)
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import timed_steps  # noqa: E402
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
  state, m, dt = timed_steps(step, state, dev, steps_n)
  t = time.time()
  for _ in range(steps_n):
    state, m = step(state, jax.device_put(host))
  jax.block_until_ready(state)
  dt_h2d = (time.time() - t) / steps_n
  return {"model": name, "dtype": dtype, "batch": batch, "params": count_params(state.params),
          "compile_s": round(compile_s, 2), "step_ms": round(dt * 1000, 3),
          "images_per_sec": round(batch / dt), "images_per_sec_with_h2d": round(batch / dt_h2d)}


def data_parallel(dtype: str, grad_accum_steps: int, batch: int, steps_n: int) -> dict:
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from jaxclf.train import distributed, precision
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  distributed.check_global_batch(batch, mesh.size, grad_accum_steps=grad_accum_steps)
  c = default_config()
  kw = {} if dtype == "float32" else {"dtype": precision.compute_dtype(dtype)}
  model = create_model("cnn", 10, **kw)
  state = distributed.replicate(
      create_train_state(jax.random.key(0), model, (28, 28, 1), create_optimizer(c),
                         loss_scale=precision.create_loss_scale(dtype)), repl)
  step = jax.jit(partial(steps.train_step, lr_fn=lambda s: 0.02, label_smoothing=0.1,
                         class_weights=jnp.ones(10), dropout_key=jax.random.key(1),
                         grad_accum_steps=grad_accum_steps),
                 in_shardings=(repl, rows), out_shardings=(repl, repl), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  # A learnable batch (the label is the brightest of 10 image bands), so the loss must fall.
  labels = rng.integers(0, 10, batch).astype(np.int32)
  images = rng.normal(size=(batch, 28, 28, 1)).astype(np.float32) * 0.1
  for i, y in enumerate(labels):
    images[i, 2 * y:2 * y + 3] += 1.0
  dev = distributed.assemble({"image": images, "label": labels}, rows)
  state, m = step(state, dev)
  first = float(m.compute()["loss"])
  state, m, dt = timed_steps(step, state, dev, steps_n)
  last = float(m.compute()["loss"])
  return {"case": "data_parallel", "dtype": dtype, "grad_accum_steps": grad_accum_steps,
          "batch": batch, "mesh": {"data": mesh.size}, "step_ms": round(dt * 1000, 3),
          "images_per_sec": round(batch / dt), "loss_first": round(first, 4),
          "loss_last": round(last, 4), "ok": bool(np.isfinite(last) and last < first)}


def kernel_selection() -> dict:
  """What conv_impl='auto' picks here: off CPU every layer must stay on XLA (cuDNN), never the CPU
  kernels (oneDNN conv / BatchNorm / depthwise, the taps)."""
  from jaxclf.models import efficientnet
  from jaxclf.models.layers import resolve_conv_impl
  got = {"conv_impl": resolve_conv_impl("auto"),
         "depthwise": efficientnet.resolve_depthwise_impl("auto")}
  got["ok"] = jax.default_backend() == "cpu" or set(got.values()) == {"xla"}
  if not got["ok"]:
    raise SystemExit(f"gpu_check: CPU kernels selected on {jax.default_backend()}: {got}")
  return got


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--out", default="docs/results/gpu_check.json")
  a = p.parse_args()
  res = {"jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()], "kernels": kernel_selection(), "cases": []}
  print(json.dumps(res["kernels"]), flush=True)
  for case in CASES:
    res["cases"].append(measure(*case, a.steps))
    print(json.dumps(res["cases"][-1]), flush=True)
  res["data_parallel"] = []
  for dtype, k in (("float32", 1), ("bfloat16", 1), ("float32", 4), ("float16", 1)):
    res["data_parallel"].append(data_parallel(dtype, k, 1024, a.steps))
    print(json.dumps(res["data_parallel"][-1]), flush=True)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
