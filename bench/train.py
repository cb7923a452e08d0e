"""Training throughput: jaxclf (JAX/Flax, jitted step) against the same architecture in PyTorch,
side by side in one invocation. Prints JSON.

  .venv/bin/python bench/train.py                 # default CNN, the anchor CNN, ResNet-18 (half width)
  .venv/bin/python bench/train.py --repeats 3 --steps 30 --out docs/results/train.json
  .venv/bin/python bench/train.py --case cnn_anchor --conv-impl xla --conv-impl matmul --conv-impl onednn
                                                  # the conv levers, each beside PyTorch, one run
  .venv/bin/python bench/train.py --case cnn_default --conv-impl onednn_conv_only --conv-impl onednn
                                                  # BatchNorm + pooling on oneDNN, before / after
  .venv/bin/python bench/train.py --conv-impl onednn_system_malloc --conv-impl onednn
                                                  # freed host memory kept mapped, before / after

Each measurement runs in its own subprocess (no thread pools shared between frameworks), on
synthetic data of the real shape, after warm-up (compilation excluded), with the optimizer and
loss of configs/cnn.py (SGD-Nesterov, wd, label smoothing). JAX and PyTorch runs alternate so
background load hits both alike. torch is a bench-only dependency (requirements/bench.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import emit, timed_steps

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

def _default_cnn():
  """configs/cnn.py's layers and batch size (read at run time, so the case follows the config)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("cnn_config", os.path.join(ROOT, "configs/cnn.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  return tuple(c.model.kwargs.layers), int(c.train.batch_size)


_DEFAULT_LAYERS, _DEFAULT_BATCH = _default_cnn()
_PREVIOUS_DEFAULT = (32, "M", 64, 64, "M", 128, "M")  # configs/cnn.py until 2026-12-01
CASES = {
    # name: (jaxclf model, model kwargs, torch ctor kwargs, batch)
    "cnn_default": ("cnn", {"layers": _DEFAULT_LAYERS}, ("CNN", {"layers": _DEFAULT_LAYERS}),
                    _DEFAULT_BATCH),
    "cnn_anchor": ("cnn", {}, ("CNN", {}), 256),
    "cnn_previous_default": ("cnn", {"layers": _PREVIOUS_DEFAULT},
                             ("CNN", {"layers": _PREVIOUS_DEFAULT}), 128),
    "resnet18_w32": ("resnet18", {"num_filters": 32, "stem": "small"}, ("ResNet18", {"width": 32}), 128),
}


def run_jax(case: str, steps: int, warmup: int, conv_impl: str = "auto") -> dict:
  sys.path.insert(0, ROOT)
  from jaxclf.ops.host_memory import reuse_freed_memory
  host_malloc = reuse_freed_memory()  # as every jaxclf command does, before JAX's threads start
  import jax
  import jax.numpy as jnp
  import numpy as np
  from functools import partial
  sys.path.insert(0, ROOT)
  from jaxclf.config import load_config
  from jaxclf.models import create_model
  from jaxclf.models.layers import resolve_conv_impl
  from jaxclf.train import steps as train_steps
  from jaxclf.train.optimizers import create_optimizer
  from jaxclf.train.schedules import create_learning_rate_fn
  from jaxclf.train.state import create_train_state, count_params

  name, kwargs, _, batch = CASES[case]
  c = load_config(os.path.join(ROOT, "configs/cnn.py"), environ={})
  conv_impl = resolve_conv_impl(conv_impl)
  model = create_model(name, 10, **kwargs, conv_impl=conv_impl)
  state = create_train_state(jax.random.key(0), model, (28, 28, 1), create_optimizer(c))
  lr_fn = create_learning_rate_fn(c, 100, 1000)
  step = jax.jit(partial(train_steps.train_step, lr_fn=lr_fn, label_smoothing=0.1,
                         class_weights=jnp.ones(10), dropout_key=jax.random.key(1)),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  b = {"image": rng.normal(size=(batch, 28, 28, 1)).astype(np.float32),
       "label": rng.integers(0, 10, batch).astype(np.int32)}
  t = time.time()
  state, m = step(state, b)
  jax.block_until_ready(state)
  compile_s = time.time() - t
  state, m, per_step = timed_steps(step, state, b, steps, warmup)
  dt = per_step * steps
  return {"images_per_sec": steps * batch / dt, "step_ms": 1000 * dt / steps,
          "compile_s": compile_s, "params": count_params(state.params), "batch": batch,
          "conv_impl": conv_impl, "host_malloc": host_malloc["mode"]}


def run_torch(case: str, steps: int, warmup: int) -> dict:
  import torch
  sys.path.insert(0, HERE)
  import torch_models
  torch.set_num_threads(os.cpu_count() or 2)
  _, _, (ctor, kw), batch = CASES[case]
  model = getattr(torch_models, ctor)(**kw).to(memory_format=torch.channels_last)
  one = torch_models.sgd_train_step(model, batch)

  t = time.time()
  one()
  first = time.time() - t
  for _ in range(warmup):
    one()
  t = time.time()
  for _ in range(steps):
    one()
  dt = time.time() - t
  return {"images_per_sec": steps * batch / dt, "step_ms": 1000 * dt / steps, "compile_s": first,
          "params": sum(p.numel() for p in model.parameters()), "batch": batch,
          "torch": torch.__version__}


# Lever sets besides the conv impls: name -> (conv impl, extra env of the child).
LEVER_SETS = {"onednn_conv_only": ("onednn", {"JAXCLF_ONEDNN_NORM_POOL": "0"}),
              # the step's scratch buffer page-faulted in afresh every step (ops/host_memory.py)
              "onednn_system_malloc": ("onednn", {"JAXCLF_HOST_MALLOC": "system"})}


def _child(framework, case, steps, warmup, conv_impl="auto") -> dict:
  impl, env = LEVER_SETS.get(conv_impl, (conv_impl, {}))
  out = subprocess.run([sys.executable, __file__, "--child", framework, "--case", case,
                        "--steps", str(steps), "--warmup", str(warmup), "--conv-impl", impl],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
  if out.returncode != 0:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs):
  vals = [r["images_per_sec"] for r in runs if "images_per_sec" in r]
  if not vals:
    return {"error": runs[0].get("error") if runs else "no runs"}
  return {"images_per_sec_mean": round(statistics.mean(vals), 1),
          "images_per_sec_std": round(statistics.stdev(vals), 1) if len(vals) > 1 else 0.0,
          "runs": [round(v, 1) for v in vals],
          **{k: runs[0][k] for k in ("params", "batch", "torch", "conv_impl", "host_malloc")
             if k in runs[0]},
          "compile_s": round(runs[0].get("compile_s", 0), 2)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child")
  p.add_argument("--case", action="append")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default="docs/results/train.json")
  p.add_argument("--conv-impl", action="append",
                 help="jaxclf conv gradient path(s) to measure: auto | xla | matmul | onednn "
                      "(repeat to compare levers in one run; default auto)")
  a = p.parse_args()
  impls = a.conv_impl or ["auto"]
  if a.child:
    if a.child == "jax":
      print(json.dumps(run_jax(a.case[0], a.steps, a.warmup, impls[0])))
    else:
      print(json.dumps(run_torch(a.case[0], a.steps, a.warmup)))
    return
  results = {"bench": "train_throughput", "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_avg_start": os.getloadavg(),
             "cases": {}}
  for case in a.case or list(CASES):
    jax_runs, torch_runs = {impl: [] for impl in impls}, []
    for _ in range(a.repeats):  # alternate so background load hits every side alike
      for impl in impls:
        jax_runs[impl].append(_child("jax", case, a.steps, a.warmup, impl))
      torch_runs.append(_child("torch", case, a.steps, a.warmup))
    t = _summary(torch_runs)
    entry = {"pytorch": t}
    for impl in impls:
      j = _summary(jax_runs[impl])
      ratio = (j["images_per_sec_mean"] / t["images_per_sec_mean"]
               if "images_per_sec_mean" in j and "images_per_sec_mean" in t else None)
      key = "jaxclf" if len(impls) == 1 else f"jaxclf[{impl}]"
      entry[key] = j
      entry["jax_over_torch" if len(impls) == 1 else f"jax_over_torch[{impl}]"] = (
          round(ratio, 3) if ratio else None)
      # Each repeat's jax run beside the torch run right after it (the same minute's load).
      pairs = [jr["images_per_sec"] / tr["images_per_sec"]
               for jr, tr in zip(jax_runs[impl], torch_runs)
               if "images_per_sec" in jr and "images_per_sec" in tr]
      entry["pairwise_ratios" if len(impls) == 1 else f"pairwise_ratios[{impl}]"] = [
          round(r, 3) for r in pairs]
    results["cases"][case] = entry
  results["load_avg_end"] = os.getloadavg()
  emit(results, a.out)


if __name__ == "__main__":
  main()
