"""Convolution timings: XLA's conv against oneDNN's (jaxclf.ops.onednn) and PyTorch's, per layer
and pass, and a whole anchor-CNN train step with each conv. Prints JSON.

  .venv/bin/python bench/conv.py                       # anchor-CNN layers at batch 256 + train step
  .venv/bin/python bench/conv.py --part layers --resnet --min-time 0.5
  .venv/bin/python bench/conv.py --part step --steps 20 --out docs/results/conv.json

Per layer and pass (forward; backward-data = dL/dx; backward-weights = dL/dkernel), median ms per
call of a jitted function (XLA: the pass alone, the rest of the VJP dead-code-eliminated; oneDNN:
the FFI call alone; PyTorch: F.conv2d / aten.convolution_backward on channels_last tensors).
Each framework runs in its own subprocess (no shared thread pools), all in the same invocation.
The train step is the anchor CNN (conv-BN-ReLU 32-32 | pool | 64-64 | pool | 128 | pool, dense)
on synthetic 28x28x1 data, SGD-Nesterov + label smoothing, with `nn.Conv` (lax) against
`onednn.conv2d` (XLA forward and oneDNN forward), and PyTorch's (bench/torch_models.CNN).
Step results give wall img/s and img per CPU-second of the process (less sensitive to other load).
torch is a bench-only dependency (scripts/setup.sh --bench).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, batch, H=W, cin, cout, k, stride)
ANCHOR = [("c1_28_1x32", 256, 28, 1, 32, 3, 1), ("c2_28_32x32", 256, 28, 32, 32, 3, 1),
          ("c3_14_32x64", 256, 14, 32, 64, 3, 1), ("c4_14_64x64", 256, 14, 64, 64, 3, 1),
          ("c5_7_64x128", 256, 7, 64, 128, 3, 1)]
RESNET = [("r_s2_32_16x32", 128, 32, 16, 32, 3, 2), ("r_p2_32_16x32", 128, 32, 16, 32, 1, 2),
          ("r_s2_16_64x128", 128, 16, 64, 128, 3, 2), ("r_p2_16_64x128", 128, 16, 64, 128, 1, 2),
          ("r_s2_8_128x256", 128, 8, 128, 256, 3, 2), ("r_p2_8_128x256", 128, 8, 128, 256, 1, 2)]
PASSES = ("fwd", "bwd_data", "bwd_weights")


def _time(fn, min_time: float, block=lambda r: r) -> float:
  """Median ms per call, after 2 warm-up calls, over at least min_time seconds (>= 5 calls)."""
  for _ in range(2):
    block(fn())
  ts, start = [], time.perf_counter()
  while len(ts) < 5 or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    block(fn())
    ts.append(time.perf_counter() - t)
  return round(1000 * statistics.median(ts), 3)


def layers_jax(shapes, min_time: float, which: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  sys.path.insert(0, ROOT)
  from jaxclf.ops import onednn
  if which == "onednn" and not onednn.available():
    return {"error": onednn.load_error()}
  out = {}
  rng = np.random.default_rng(0)
  for name, n, hw, cin, cout, k, s in shapes:
    x = jnp.asarray(rng.normal(size=(n, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    y_shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
        x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), x, w).shape
    dy = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    if which == "xla":
      conv = lambda x, w: lax.conv_general_dilated(x, w, (s, s), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      fns = {"fwd": jax.jit(conv),
             "bwd_data": jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0]),
             "bwd_weights": jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1])}
      args = {"fwd": (x, w), "bwd_data": (x, w, dy), "bwd_weights": (x, w, dy)}
    else:
      pads = onednn._pads("SAME", (hw, hw), (k, k), (s, s))
      fns = {"fwd": jax.jit(lambda x, w: onednn._ffi("fwd", y_shape, x, w, (s, s), pads)),
             "bwd_data": jax.jit(lambda dy, w: onednn._ffi("bwd_data", x.shape, dy, w, (s, s), pads)),
             "bwd_weights": jax.jit(lambda x, dy: onednn._ffi("bwd_weights", w.shape, x, dy, (s, s),
                                                              pads))}
      args = {"fwd": (x, w), "bwd_data": (dy, w), "bwd_weights": (x, dy)}
    out[name] = {p: _time(lambda p=p: fns[p](*args[p]), min_time, jax.block_until_ready)
                 for p in PASSES}
    if which == "onednn":
      out[name]["impl"] = {p: onednn.impl_info(p, x.shape, w.shape, (s, s)) for p in PASSES}
  return out


def layers_torch(shapes, min_time: float) -> dict:
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count() or 2)
  out = {}
  g = torch.Generator().manual_seed(0)
  for name, n, hw, cin, cout, k, s in shapes:
    x = torch.randn(n, cin, hw, hw, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, generator=g).to(memory_format=torch.channels_last)
    pad = k // 2 if s == 1 else (k - 1) // 2  # PyTorch's symmetric padding; same output size
    y = F.conv2d(x, w, stride=s, padding=pad)
    dy = torch.randn(y.shape, generator=g).to(memory_format=torch.channels_last)

    def bwd(mask):
      return torch.ops.aten.convolution_backward(dy, x, w, None, [s, s], [pad, pad], [1, 1],
                                                 False, [0, 0], 1, mask)
    with torch.no_grad():
      out[name] = {"fwd": _time(lambda: F.conv2d(x, w, stride=s, padding=pad), min_time),
                   "bwd_data": _time(lambda: bwd([True, False, False]), min_time),
                   "bwd_weights": _time(lambda: bwd([False, True, False]), min_time)}
  out["torch"] = torch.__version__
  return out


def step_jax(conv: str, steps: int, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  import optax
  sys.path.insert(0, ROOT)
  from jaxclf.models.layers import max_pool_2x2
  from jaxclf.ops import onednn

  class OnednnConv(nn.Module):
    features: int
    forward: str

    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", nn.initializers.lecun_normal(),
                          (3, 3, x.shape[-1], self.features), jnp.float32)
      return onednn.conv2d(x, kernel, strides=(1, 1), padding="SAME", forward=self.forward)

  class Anchor(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      for spec in (32, 32, "M", 64, 64, "M", 128, "M"):
        if spec == "M":
          x = max_pool_2x2(x)
          continue
        if conv == "lax":
          x = nn.Conv(spec, (3, 3), use_bias=False)(x)
        else:
          x = OnednnConv(spec, forward=conv.split("_")[1])(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      x = x.reshape((x.shape[0], -1))
      return nn.Dense(10)(x)

  if conv != "lax" and not onednn.available():
    return {"error": onednn.load_error()}
  model = Anchor()
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9, nesterov=True))
  params, stats = v["params"], v["batch_stats"]
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      labels = optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1)
      return optax.softmax_cross_entropy(logits, labels).mean(), upd["batch_stats"]
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  t = time.time()
  state = step(params, stats, opt, x, y)
  jax.block_until_ready(state)
  compile_s = time.time() - t
  for _ in range(3):
    state = step(*state[:3], x, y)
  jax.block_until_ready(state)
  t, c = time.time(), time.process_time()
  for _ in range(steps):
    state = step(*state[:3], x, y)
  jax.block_until_ready(state)
  dt, cpu = time.time() - t, time.process_time() - c
  # CPU seconds the process used per step (all threads, spin-waits included): less sensitive to
  # other load on the machine than wall time; batch / (cpu / cores) is the img/s it would reach
  # with the cores to itself.
  return {"images_per_sec": round(steps * batch / dt, 1), "step_ms": round(1000 * dt / steps, 2),
          "cpu_ms_per_step": round(1000 * cpu / steps, 1),
          "images_per_cpu_sec": round(steps * batch / cpu, 1),
          "compile_s": round(compile_s, 2), "loss": float(state[3])}


def step_torch(steps: int, batch: int) -> dict:
  """The same anchor CNN in PyTorch (bench/torch_models.CNN, channels_last), same optimizer."""
  import torch
  sys.path.insert(0, HERE)
  import torch_models
  torch.set_num_threads(os.cpu_count() or 2)
  model = torch_models.CNN().to(memory_format=torch.channels_last)
  one = torch_models.sgd_train_step(model, batch)

  for _ in range(3):
    one()
  t, c = time.time(), time.process_time()
  for _ in range(steps):
    loss = one()
  dt, cpu = time.time() - t, time.process_time() - c
  return {"images_per_sec": round(steps * batch / dt, 1), "step_ms": round(1000 * dt / steps, 2),
          "cpu_ms_per_step": round(1000 * cpu / steps, 1),
          "images_per_cpu_sec": round(steps * batch / cpu, 1), "loss": float(loss.detach()),
          "torch": torch.__version__}


def _child(args: list[str], env=None) -> dict:
  out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
  if out.returncode != 0:
    return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child")
  p.add_argument("--part", choices=("layers", "step", "all"), default="all")
  p.add_argument("--resnet", action="store_true", help="also the ResNet stride-2 / 1x1 shapes")
  p.add_argument("--min-time", type=float, default=0.3, help="seconds per (layer, pass) timing")
  p.add_argument("--steps", type=int, default=15)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default="docs/results/conv.json")
  a = p.parse_args()
  shapes = ANCHOR + (RESNET if a.resnet else [])
  if a.child:
    kind, _, arg = a.child.partition(":")
    if kind == "layers":
      r = layers_torch(shapes, a.min_time) if arg == "torch" else layers_jax(shapes, a.min_time, arg)
    else:
      r = step_torch(a.steps, a.batch) if arg == "torch" else step_jax(arg, a.steps, a.batch)
    print(json.dumps(r))
    return
  common = ["--min-time", str(a.min_time), "--steps", str(a.steps), "--batch", str(a.batch)]
  common += ["--resnet"] if a.resnet else []
  res = {"bench": "conv", "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
  if a.part in ("layers", "all"):
    fw = ["xla", "onednn"] + ([] if a.no_torch else ["torch"])
    per = {f: _child(["--child", f"layers:{f}", *common]) for f in fw}
    table = {}
    for name, *_ in shapes:
      row = {}
      for f in fw:
        r = per[f].get(name)
        row[f] = r if r is not None else {"error": per[f].get("error")}
      x, o = row["xla"], row["onednn"]
      if all(pp in x and pp in o for pp in PASSES):
        row["xla_over_onednn"] = {pp: round(x[pp] / o[pp], 2) for pp in PASSES}
      table[name] = row
    res["layers_ms"] = table
    if "torch" in per:
      res["torch"] = per["torch"].get("torch", per["torch"].get("error"))
  if a.part in ("step", "all"):
    step = {}
    for _ in range(a.repeats):  # alternate so background load hits all alike
      for c in ("lax", "onednn_xla", "onednn_onednn"):
        step.setdefault(c, []).append(_child(["--child", f"step:{c}", *common]))
      if not a.no_torch:
        step.setdefault("pytorch", []).append(_child(["--child", "step:torch", *common]))
    res["train_step_anchor_cnn"] = {
        "batch": a.batch,
        **{c: {"images_per_sec": [r.get("images_per_sec") and round(r["images_per_sec"], 1)
                                  for r in runs],
               "images_per_cpu_sec": [r.get("images_per_cpu_sec") for r in runs],
               **({"error": runs[0]["error"]} if "error" in runs[0] else {})}
           for c, runs in step.items()}}
  res["load_avg_end"] = os.getloadavg()
  text = json.dumps(res, indent=1)
  print(text)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
