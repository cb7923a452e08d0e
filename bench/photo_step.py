"""The photo path's training step: jaxclf against a PyTorch twin at the same batch, for the nets a
photo fine-tune uses (EfficientNet-Lite0 / -B0, ResNet-18 / -50 with the ImageNet stem, VGG-11 BN),
RGB at 64-224 px, 10 classes, synthetic data. Three phases of a fine-tune, each its own row:

  train     the full train step (jaxclf.train.steps.train_step jitted with the state donated;
            PyTorch: forward, backward, SGD step). SGD-Nesterov of configs/cnn.py (momentum 0.9,
            weight decay 5e-4 off BN and biases), label smoothing 0.1, dropout / stochastic depth
            on, BatchNorm in training mode
  frozen    the frozen-backbone step of train.freeze_backbone_epochs on images
            (steps.train_step with finetune.backbone_mask as `frozen_backbone`, the fine-tuning
            optimizer's backbone gate at 0, as jaxclf/train/loop.py builds it; PyTorch: the
            backbone in eval mode under no_grad, only the classifier in the optimizer).
            configs/photos.py caches the features instead (train.cache_frozen_features): its
            frozen epochs cost `features` once plus a head step on 1280-d vectors
            (bench/lite0_step.py's lite0_head_step)
  features  the backbone forward that fills the feature cache (train.cache_frozen_features:
            finetune.create_feature_fn, inference mode, the classifier skipped; PyTorch: eval +
            no_grad forward up to the pooled features)
  unfrozen  (only when asked for: --phase unfrozen) the photo recipe's step after its frozen
            epochs, what most of a configs/photos.py fine-tune runs: everything trains, but with
            train.freeze_batchnorm (BatchNorm on running statistics, no dropout / stochastic
            depth) and optimizer.lr_mults backbone=0.1 (param groups); PyTorch: model.eval(),
            every parameter in the optimizer, the backbone's groups at 0.1x the rate

  .venv/bin/python bench/photo_step.py --out docs/results/photo_step.json
                                         # the default cases (below), all three phases
  .venv/bin/python bench/photo_step.py --case all --out docs/results/photo_step_all.json
  .venv/bin/python bench/photo_step.py --case lite0_128 --case lite0_224 --phase train
  .venv/bin/python bench/photo_step.py --case resnet50_128 --conv-impl xla --conv-impl onednn
                                         # conv levers, each beside PyTorch, one run
  .venv/bin/python bench/photo_step.py --case lite0_128 --env none --env SOME_LEVER=0
                                         # environment lever sets (A/B in one run)
  .venv/bin/python bench/photo_step.py --steps 2 --warmup 1 --repeats 1 --case vgg11_64  # smoke

Cases (name: jaxclf model | PyTorch twin, px, batch; * = in the default run, the rows of issue
26's table):
* lite0_128     efficientnet_lite0 | efficientnet_lite_pytorch "efficientnet-lite0", 128, 32
  lite0_224     the same, 224, 16
  b0_128        efficientnet_b0 | efficientnet_pytorch (lukemelas) "efficientnet-b0", 128, 32
* resnet18_128  resnet18 stem='imagenet' | torch_models.ResNet18(stem='imagenet'), 128, 32
  resnet18_224  the same, 224, 16
* resnet50_128  resnet50 (v1.5 bottleneck) stem='imagenet' | torch_models.ResNet50, 128, 16
  resnet50_224  the same, 224, 16
* vgg11_64      vgg11 (BN, GAP + dropout + dense head) | torch_models.VGG11BN, 64, 32

Every measurement (framework, case, phase, conv impl / lever set, repeat) runs in its own child
process; within a repeat the jaxclf children run first and the PyTorch child right after them,
so background load hits both alike. jaxclf children call ops.host_memory.reuse_freed_memory()
first, as every jaxclf command does, and clone the model with conv_impl=resolve_conv_impl(impl)
when it has that field (EfficientNet's depthwise convs follow efficientnet.DEPTHWISE_IMPL,
'auto'). PyTorch children: torch.set_num_threads(os.cpu_count()), channels_last model and input.
Each child times `--steps` calls after one first call (compile_s) and `--warmup` more.

JSON (`cases.<case>.<phase>`); with more than one conv impl or lever set the jaxclf keys carry
`[<impl>]` or `[<impl>|<env>]`:
  jaxclf, pytorch        images_per_sec_mean / _std over the repeats, runs (each repeat's img/s),
                         ms_per_step_mean, compile_s (first call: jit compile + one step; for
                         PyTorch the first step), batch, size, conv_impl, host_malloc, versions
  jax_over_torch         mean jaxclf img/s / mean PyTorch img/s (> 1: jaxclf faster)
  pairwise_ratios        each repeat's jaxclf run / the PyTorch run right after it
`cases.<case>.params`: parameter counts of both sides (total, head = the classifier, backbone =
the rest; BatchNorm statistics are not parameters); `match` says the backbones are equal, and a
warning is printed and recorded in `warnings` when they are not. `load_avg_start/end`: the
machine's load (the 2-core dev machine is shared; say it beside the numbers).

`warnings` also says when the machine was busy before the run (1-minute load >= half the cores);
`load_1m_before` gives each child's starting load (the bench's own previous child adds ~1-2).
Run it quiet: under oversubscription PyTorch's OpenMP pool slows down far more than XLA's (at
load 6.5 on 2 cores Lite0's eval forward took 0.80 s on 1 torch thread, 1.46 s on 2), so a
loaded run flatters jaxclf.

Cost: the default run (4 cases x 3 phases x 2 frameworks x --repeats 2 = 48 children, --steps 10
--warmup 3) should take about 15 minutes on 2 quiet cores, `--case all` (96 children) about 40
(estimated, not measured quiet); jaxclf's compile (up to ~25 s
for a Lite0 / B0 train step) is a large part of each child. Absolute numbers
differ ~2x between machines of the same kind: only the ratios are results.
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

CASES = {
    # name: (jaxclf model, its kwargs, (torch_models constructor, its kwargs), size, batch)
    "lite0_128": ("efficientnet_lite0", {}, ("lite0", {}), 128, 32),
    "lite0_224": ("efficientnet_lite0", {}, ("lite0", {}), 224, 16),
    "b0_128": ("efficientnet_b0", {}, ("b0", {}), 128, 32),
    "resnet18_128": ("resnet18", {"stem": "imagenet"},
                     ("ResNet18", {"in_ch": 3, "stem": "imagenet"}), 128, 32),
    "resnet18_224": ("resnet18", {"stem": "imagenet"},
                     ("ResNet18", {"in_ch": 3, "stem": "imagenet"}), 224, 16),
    "resnet50_128": ("resnet50", {"stem": "imagenet"}, ("ResNet50", {}), 128, 16),
    "resnet50_224": ("resnet50", {"stem": "imagenet"}, ("ResNet50", {}), 224, 16),
    "vgg11_64": ("vgg11", {}, ("VGG11BN", {}), 64, 32),
}
# The default run: one case per architecture family (a ~15 minute run on 2 quiet cores); `--case all`
# runs every case (~40 minutes).
DEFAULT_CASES = ("lite0_128", "resnet18_128", "resnet50_128", "vgg11_64")
PHASES = ("train", "frozen", "features", "unfrozen")
DEFAULT_PHASES = ("train", "frozen", "features")
NUM_CLASSES = 10
CHANNELS = 3
# Conv impls that are lever sets of bench/train.py (conv impl + the child's environment).
LEVER_SETS = {"onednn_conv_only": ("onednn", {"JAXCLF_ONEDNN_NORM_POOL": "0"}),
              "onednn_system_malloc": ("onednn", {"JAXCLF_HOST_MALLOC": "system"})}


def _timed_calls(fn, steps: int, warmup: int, block) -> tuple[float, float]:
  """(first call's seconds, seconds per call of `steps` calls after `warmup` more)."""
  t = time.time()
  block(fn())
  first = time.time() - t
  for _ in range(warmup):
    out = fn()
  block(out if warmup else None)
  t = time.time()
  for _ in range(steps):
    out = fn()
  block(out)
  return first, (time.time() - t) / steps


def run_jax(case: str, phase: str, steps: int, warmup: int, conv_impl: str) -> dict:
  sys.path.insert(0, ROOT)
  from jaxclf.ops.host_memory import reuse_freed_memory
  host_malloc = reuse_freed_memory()  # as every jaxclf command does, before JAX's threads start
  from functools import partial

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxclf.config import load_config
  from jaxclf.models import create_model, param_groups
  from jaxclf.models.layers import resolve_conv_impl
  from jaxclf.train import finetune
  from jaxclf.train import steps as train_steps
  from jaxclf.train.optimizers import create_optimizer
  from jaxclf.train.schedules import create_learning_rate_fn
  from jaxclf.train.state import count_params, create_train_state

  name, kwargs, _, size, batch = CASES[case]
  model = create_model(name, NUM_CLASSES, **kwargs)
  impl = None
  if hasattr(model, "conv_impl"):
    impl = resolve_conv_impl(conv_impl)
    model = model.clone(conv_impl=impl)
  c = load_config(os.path.join(ROOT, "configs/cnn.py:anchor"), environ={})
  if phase == "frozen":  # the fine-tuning optimizer (param groups + backbone gate), as loop.py
    c.model.name = name
    c.train.freeze_backbone_epochs = 1
  elif phase == "unfrozen":  # configs/photos.py's optimizer groups after the frozen epochs
    c.model.name = name
    c.optimizer.lr_mults = "backbone=0.1"
  state = create_train_state(jax.random.key(0), model, (size, size, CHANNELS),
                             create_optimizer(c))
  rng = np.random.default_rng(0)
  b = {"image": jnp.asarray(rng.normal(size=(batch, size, size, CHANNELS)), jnp.float32),
       "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)}
  step_kw = dict(lr_fn=create_learning_rate_fn(c, 100, 1000), label_smoothing=0.1,
                 class_weights=jnp.ones(NUM_CLASSES), dropout_key=jax.random.key(1))
  groups = jax.tree_util.tree_map_with_path(lambda p, _: param_groups.group_of(name, p),
                                            state.params)
  head_params = sum(x.size for x, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(groups))
                    if g == "head")
  total = count_params(state.params)

  if phase == "features":
    fn = finetune.create_feature_fn(state.apply_fn, finetune.single_dense_head(name, state.params))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    compile_s, per = _timed_calls(lambda: fn(variables, b), steps, warmup,
                                  jax.block_until_ready)
  else:
    extra = {}
    if phase == "frozen":
      extra = dict(frozen_backbone=finetune.backbone_mask(name, state.params),
                   freeze_backbone_steps=10**9)  # the gate stays 0 for every timed step
    elif phase == "unfrozen":
      extra = dict(freeze_batchnorm=True)
    step = jax.jit(partial(train_steps.train_step, **step_kw, **extra), donate_argnums=(0,))
    t = time.time()
    state, _ = step(state, b)
    jax.block_until_ready(state)
    compile_s = time.time() - t
    state, _, per = timed_steps(step, state, b, steps, warmup)
  from jaxclf.models import efficientnet
  return {"images_per_sec": batch / per, "step_ms": 1000 * per, "compile_s": compile_s,
          "params": {"total": total, "head": int(head_params),
                     "backbone": total - int(head_params)},
          "batch": batch, "size": size, "conv_impl": impl,
          **({"depthwise_impl": efficientnet.DEPTHWISE_IMPL} if name.startswith("efficientnet")
             else {}),
          "host_malloc": host_malloc["mode"], "jax": jax.__version__}


def run_torch(case: str, phase: str, steps: int, warmup: int) -> dict:
  import torch
  sys.path.insert(0, HERE)
  import torch_models
  torch.set_num_threads(os.cpu_count() or 2)
  torch.manual_seed(0)
  _, _, (ctor, kw), size, batch = CASES[case]
  model = getattr(torch_models, ctor)(num_classes=NUM_CLASSES, **kw)
  model = model.to(memory_format=torch.channels_last)
  make = {"train": torch_models.sgd_train_step, "frozen": torch_models.frozen_train_step,
          "features": torch_models.feature_forward,
          "unfrozen": torch_models.unfrozen_train_step}[phase]
  one = make(model, batch, size=size, in_ch=CHANNELS)
  first, per = _timed_calls(one, steps, warmup, lambda _: None)
  total = sum(p.numel() for p in model.parameters())
  head = sum(p.numel() for p in torch_models.head_of(model).parameters())
  return {"images_per_sec": batch / per, "step_ms": 1000 * per, "compile_s": first,
          "params": {"total": total, "head": head, "backbone": total - head},
          "batch": batch, "size": size, "torch": torch.__version__,
          "threads": torch.get_num_threads()}


def _parse_env(spec: str) -> dict:
  """'none' | '' -> {}; 'K=V,K2=V2' -> {K: V, K2: V2}."""
  if spec in ("", "none"):
    return {}
  env = {}
  for item in spec.split(","):
    k, sep, v = item.partition("=")
    if not sep or not k.strip():
      raise SystemExit(f"--env {spec!r}: expected KEY=VAL[,KEY=VAL] or 'none'")
    env[k.strip()] = v
  return env


def _child(framework, case, phase, steps, warmup, conv_impl="auto", env=None,
           timeout=None) -> dict:
  impl, lever_env = LEVER_SETS.get(conv_impl, (conv_impl, {}))
  load = os.getloadavg()[0]
  cmd = [sys.executable, __file__, "--child", framework, "--case", case, "--phase", phase,
         "--steps", str(steps), "--warmup", str(warmup), "--conv-impl", impl]
  t = time.time()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, **lever_env, **(env or {})})
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  if out.returncode != 0:
    lines = out.stderr.strip().splitlines()
    return {"error": lines[-1] if lines else f"exit {out.returncode}"}
  r = json.loads(out.stdout.strip().splitlines()[-1])
  r["child_wall_s"] = round(time.time() - t, 1)
  r["load_1m_before"] = round(load, 2)
  return r


def _summary(runs):
  ok = [r for r in runs if "images_per_sec" in r]
  if not ok:
    return {"error": runs[0].get("error") if runs else "no runs"}
  vals = [r["images_per_sec"] for r in ok]
  return {"images_per_sec_mean": round(statistics.mean(vals), 1),
          "images_per_sec_std": round(statistics.stdev(vals), 1) if len(vals) > 1 else 0.0,
          "runs": [round(v, 1) for v in vals],
          "ms_per_step_mean": round(statistics.mean(r["step_ms"] for r in ok), 1),
          **{k: ok[0][k] for k in ("batch", "size", "conv_impl", "depthwise_impl",
                                   "host_malloc", "jax", "torch", "threads") if k in ok[0]},
          "compile_s": round(ok[0]["compile_s"], 2),
          "child_wall_s": [r.get("child_wall_s") for r in ok],
          "load_1m_before": [r.get("load_1m_before") for r in ok],
          **({"errors": [r["error"] for r in runs if "error" in r]} if len(ok) < len(runs)
             else {})}


def _params_entry(jax_runs, torch_runs):
  j = next((r["params"] for r in jax_runs if "params" in r), None)
  t = next((r["params"] for r in torch_runs if "params" in r), None)
  if j is None or t is None:
    return None, None
  entry = {"jaxclf": j, "pytorch": t, "match": j["backbone"] == t["backbone"],
           "total_match": j["total"] == t["total"]}
  warning = None
  if not entry["match"]:
    warning = (f"backbone parameters differ: jaxclf {j['backbone']:,} vs PyTorch "
               f"{t['backbone']:,} (heads {j['head']:,} / {t['head']:,})")
  return entry, warning


def main():
  p = argparse.ArgumentParser(description="The photo path's train step (and fine-tune phases), "
                              "jaxclf against PyTorch twins; see the module docstring.")
  p.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--case", action="append", choices=sorted(CASES) + ["all"],
                 help="repeat for several; 'all' for every case (default: "
                      f"{', '.join(DEFAULT_CASES)})")
  p.add_argument("--phase", action="append", choices=PHASES,
                 help="train | frozen | features | unfrozen; repeat for several (default: "
                      f"{', '.join(DEFAULT_PHASES)})")
  p.add_argument("--steps", type=int, default=10, help="timed calls per child")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
  p.add_argument("--repeats", type=int, default=2, help="alternating jaxclf/PyTorch rounds")
  p.add_argument("--conv-impl", action="append",
                 help="jaxclf conv path(s): auto | xla | matmul | onednn, or a lever set of "
                      f"bench/train.py ({', '.join(LEVER_SETS)}); repeat to compare in one run "
                      "(default auto)")
  p.add_argument("--env", action="append",
                 help="a lever set for the jaxclf children: KEY=VAL[,KEY=VAL] or 'none' (no "
                      "extra environment); repeat to compare sets in one run (each crossed with "
                      "every --conv-impl)")
  p.add_argument("--child-timeout", type=float, default=1800, help="seconds per child")
  p.add_argument("--out", default="docs/results/photo_step.json")
  a = p.parse_args()
  impls = a.conv_impl or ["auto"]
  if a.child:
    if a.child == "jax":
      print(json.dumps(run_jax(a.case[0], a.phase[0], a.steps, a.warmup, impls[0])))
    else:
      print(json.dumps(run_torch(a.case[0], a.phase[0], a.steps, a.warmup)))
    return

  env_specs = a.env or []
  variants = [(impl, spec) for impl in impls for spec in (env_specs or [None])]
  envs = {spec: _parse_env(spec) for spec in env_specs}
  single = len(variants) == 1

  def key(base, impl, spec):
    if single:
      return base
    return f"{base}[{impl}]" if spec is None else f"{base}[{impl}|{spec}]"

  results = {"bench": "photo_step", "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_avg_start": os.getloadavg(),
             "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
             "conv_impls": impls, "env_sets": env_specs, "cases": {}, "warnings": []}
  t0 = time.time()
  cases = list(CASES) if "all" in (a.case or []) else (a.case or list(DEFAULT_CASES))
  ncpu = os.cpu_count() or 2
  if results["load_avg_start"][0] >= ncpu / 2:
    results["warnings"].append(
        f"load {results['load_avg_start'][0]:.1f} on {ncpu} cores before the run: PyTorch's "
        "OpenMP threads slow down far more than XLA's when cores are oversubscribed, so the "
        "ratios flatter jaxclf; rerun on a quiet machine")
    print(f"photo_step: WARNING {results['warnings'][-1]}", file=sys.stderr)
  for case in cases:
    phases = a.phase or list(DEFAULT_PHASES)
    jax_runs = {ph: {v: [] for v in variants} for ph in phases}
    torch_runs = {ph: [] for ph in phases}
    for _ in range(a.repeats):  # alternate so background load hits every side alike
      for ph in phases:
        for impl, spec in variants:
          jax_runs[ph][(impl, spec)].append(
              _child("jax", case, ph, a.steps, a.warmup, impl, envs.get(spec),
                     a.child_timeout))
        torch_runs[ph].append(_child("torch", case, ph, a.steps, a.warmup,
                                     timeout=a.child_timeout))
    entry = {}
    for ph in phases:
      t = _summary(torch_runs[ph])
      row = {"pytorch": t}
      for impl, spec in variants:
        runs = jax_runs[ph][(impl, spec)]
        j = _summary(runs)
        if spec is not None:
          j["env"] = envs[spec]
        ratio = (j["images_per_sec_mean"] / t["images_per_sec_mean"]
                 if "images_per_sec_mean" in j and "images_per_sec_mean" in t else None)
        row[key("jaxclf", impl, spec)] = j
        row[key("jax_over_torch", impl, spec)] = round(ratio, 3) if ratio else None
        # Each repeat's jax run beside the torch run right after it (the same minute's load).
        row[key("pairwise_ratios", impl, spec)] = [
            round(jr["images_per_sec"] / tr["images_per_sec"], 3)
            for jr, tr in zip(runs, torch_runs[ph])
            if "images_per_sec" in jr and "images_per_sec" in tr]
      entry[ph] = row
    all_jax = [r for ph in phases for runs in jax_runs[ph].values() for r in runs]
    params, warning = _params_entry(all_jax, [r for ph in phases for r in torch_runs[ph]])
    entry["params"] = params
    if warning:
      print(f"photo_step: WARNING {case}: {warning}", file=sys.stderr)
      results["warnings"].append(f"{case}: {warning}")
    results["cases"][case] = entry
  results["load_avg_end"] = os.getloadavg()
  results["wall_s"] = round(time.time() - t0, 1)
  emit(results, a.out)


if __name__ == "__main__":
  main()
