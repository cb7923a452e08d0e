"""Data-parallel training throughput: 1 process vs 2 processes (jax.distributed on 127.0.0.1),
a simulated 4-device mesh, and bfloat16 vs float32 compute, all in one run -> JSON.

  .venv/bin/python bench/distributed.py [--steps 20] [--batch 256] [--out docs/results/distributed.json]
      [--trainer-steps 192] [--no-trainer]

Every case trains the default CNN (configs/cnn.py's model, conv on oneDNN where float32) with the
real jitted step (jaxclf/train/steps.py) on a global batch of `--batch` random Fashion-MNIST-
shaped images, after 3 warm-up steps, and reports global img/s:
  fp32_1proc_1dev   the baseline: one process, one CPU device, both cores
  fp32_1proc_4dev   one process, 4 simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=4):
                    the multi-device code path of a 4-GPU host, sharding and all
  fp32_2proc        two processes joined by jax.distributed (coordinator on 127.0.0.1), one
                    device and one pinned core each, Gloo all-reduce between them: the multi-host path
  bf16_1proc_1dev   model.dtype=bfloat16 (params float32); XLA's convolution, since the oneDNN
                    kernels here are float32 only
On 2 cores the 2-process case cannot be faster: it measures what the path costs. The ratios are
against fp32_1proc_1dev of the same run.

`trainer` rows: the same comparisons through the whole trainer (`jaxclf train`: data, on-device
augmentation, global batches from each process's rows, evaluation, checkpoints) on
configs/cnn.py:tiny over a 4,096-image Fashion-MNIST subset, batch 64: float32 and bfloat16 each
train --trainer-steps steps (3 epochs) and report val and test accuracy; the 4-device and
2-process runs train one epoch for their img/s. img/s is run.json's last logged window (16
steady steps, compilation and evaluation outside it).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
  """One process of one case: prints its img/s as JSON."""
  sys.path.insert(0, ROOT)
  from jaxclf.ops.host_memory import reuse_freed_memory
  reuse_freed_memory()
  from jaxclf.train import distributed as dist
  settings = dist.Settings.from_config(json.loads(args.settings))
  dist.initialize(settings)
  from functools import partial
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxclf.models.cnn import CNN
  from jaxclf.models.layers import resolve_conv_impl
  from jaxclf.train import precision, steps
  from jaxclf.train.state import create_train_state

  mesh = Mesh(np.array(jax.devices()), ("data",))
  repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  dtype = precision.compute_dtype(args.dtype)
  model = CNN(num_classes=10, weight_init="torch", dtype=dtype,
              conv_impl=resolve_conv_impl("auto"))
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9, nesterov=True)
  state = jax.device_put(create_train_state(jax.random.key(0), model, (28, 28, 1), tx,
                                            loss_scale=precision.create_loss_scale(args.dtype)),
                         repl)
  step = jax.jit(partial(steps.train_step, lr_fn=lambda s: 0.05, label_smoothing=0.1,
                         class_weights=jnp.ones(10), dropout_key=jax.random.key(1)),
                 in_shardings=(repl, rows), out_shardings=(repl, repl), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, args.batch).astype(np.int32)
  local = dist.local_rows(args.batch, jax.process_index(), jax.process_count())
  batch = {k: jax.make_array_from_process_local_data(rows, v[local])
           for k, v in (("image", images), ("label", labels))}
  for _ in range(3):
    state, m = step(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, batch)
  jax.block_until_ready(state)
  wall = time.perf_counter() - t0
  print(json.dumps({"process": jax.process_index(), "img_s": round(args.steps * args.batch / wall, 1),
                    "step_ms": round(1000 * wall / args.steps, 2),
                    "loss": float(m.compute()["loss"]), "topology": dist.topology(mesh),
                    # layers.py falls back to XLA's convolution for anything but float32
                    "conv_impl": model.conv_impl if args.dtype == "float32" else "xla"}),
        flush=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_case(name: str, args, processes: int = 1, devices: int = 1, dtype: str = "float32"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for p in range(processes):
    settings = ({"coordinator": coordinator, "num_processes": processes, "process_id": p,
                 "init_timeout_s": 120} if processes > 1 else {})
    penv, pre = dict(env), None
    if processes > 1:  # split the cores, as `jaxclf sweep --parallel` does
      cores = sorted(os.sched_getaffinity(0))
      mine = [cores[p % len(cores)]]
      penv.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
      pre = lambda mine=mine: os.sched_setaffinity(0, mine)
    procs.append(subprocess.Popen(
        [sys.executable, __file__, "--worker", "--settings", json.dumps(settings),
         "--steps", str(args.steps), "--batch", str(args.batch), "--dtype", dtype],
        env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre))
  rows = []
  for p in procs:
    out, err = p.communicate(timeout=1800)
    if p.returncode != 0:
      raise SystemExit(f"{name}: a process failed:\n{err[-3000:]}")
    rows.append(json.loads(out.strip().splitlines()[-1]))
  # Every process steps the same global batch in lockstep: the slowest one sets the pace.
  return {"case": name, "processes": processes, "devices": devices, "dtype": dtype,
          "img_s": min(r["img_s"] for r in rows), "step_ms": max(r["step_ms"] for r in rows),
          "conv_impl": rows[0]["conv_impl"], "loss_after": rows[0]["loss"],
          "topology": rows[0]["topology"]}


TRAINER_CONFIG = ["data.limit_per_split=4096", "train.batch_size=64", "periodic.log=16 steps",
                  "periodic.checkpoint=64 steps", "train.calibrate=false", "train.num_epochs=3",
                  "optimizer.learning_rate=0.05"]


def trainer_case(name: str, workroot: str, steps: int, processes: int = 1, devices: int = 1,
                 dtype: str = "float32") -> dict:
  """One `jaxclf train` run (per process), read back from its run.json."""
  workdir = os.path.join(workroot, name)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAXCLF_LOGLEVEL="WARNING")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  sets = [*TRAINER_CONFIG, f"model.dtype={dtype}", f"train.max_steps={steps}"]
  port = free_port()
  procs = []
  for p in range(processes):
    mine = sets + ([f"distributed.coordinator=127.0.0.1:{port}",
                    f"distributed.num_processes={processes}", f"distributed.process_id={p}"]
                   if processes > 1 else [])
    cores = sorted(os.sched_getaffinity(0))
    pre = (lambda c=[cores[p % len(cores)]]: os.sched_setaffinity(0, c)) if processes > 1 else None
    cmd = [sys.executable, "-m", "jaxclf.cli", "train", "--config", "configs/cnn.py:tiny",
           "--workdir", workdir, *[x for s in mine for x in ("--set", s)]]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, preexec_fn=pre))
  for p in procs:
    _, err = p.communicate(timeout=3600)
    if p.returncode != 0:
      raise SystemExit(f"trainer {name}: a process failed:\n{err[-3000:]}")
  with open(os.path.join(workdir, "run.json")) as f:
    r = json.load(f)
  metrics = r.get("metrics") or {}
  return {"case": name, "processes": processes, "devices": devices, "dtype": dtype,
          "steps": r["final_step"], "img_s": round(r["last_train"]["images_per_sec"], 1),
          "val_accuracy": (metrics.get("val") or {}).get("accuracy"),
          "test_accuracy": (metrics.get("test") or {}).get("accuracy"),
          "train_loss_last": round(r["last_train"]["loss"], 4), "topology": r["topology"],
          "duration_s": r["duration_s"]}


def trainer_cases(steps: int) -> list[dict]:
  import tempfile
  with tempfile.TemporaryDirectory(prefix="bench_distributed_") as root:
    epoch = 4096 // 64  # steps per epoch (data.limit_per_split keeps 4,096 train images)
    cases = [trainer_case("trainer_fp32_1proc_1dev", root, steps),
             trainer_case("trainer_bf16_1proc_1dev", root, steps, dtype="bfloat16"),
             trainer_case("trainer_fp32_1proc_4dev", root, epoch, devices=4),
             trainer_case("trainer_fp32_2proc", root, epoch, processes=2)]
  base = cases[0]["img_s"]
  for c in cases:
    c["ratio_vs_trainer_fp32_1proc_1dev"] = round(c["img_s"] / base, 3)
  return cases


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--out", default="docs/results/distributed.json")
  p.add_argument("--trainer-steps", type=int, default=192)
  p.add_argument("--no-trainer", action="store_true", help="only the step-level cases")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  load = os.getloadavg()[0]
  cases = [run_case("fp32_1proc_1dev", args),
           run_case("fp32_1proc_4dev", args, devices=4),
           run_case("fp32_2proc", args, processes=2),
           run_case("bf16_1proc_1dev", args, dtype="bfloat16")]
  base = cases[0]["img_s"]
  for c in cases:
    c["ratio_vs_fp32_1proc_1dev"] = round(c["img_s"] / base, 3)
  trainer = [] if args.no_trainer else trainer_cases(args.trainer_steps)
  emit({"bench": "distributed", "batch": args.batch, "steps": args.steps,
        "cpu_count": os.cpu_count(), "loadavg_start": round(load, 2),
        # More runnable work than cores: other jobs shared them, and the ratios (2 processes
        # most of all, which claim a larger share of contended cores) are not this path's cost.
        "contended": load > (os.cpu_count() or 1),
        "loadavg_end": round(os.getloadavg()[0], 2), "cases": cases,
        "trainer": {"config": ["configs/cnn.py:tiny", *TRAINER_CONFIG], "cases": trainer},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, args.out)


if __name__ == "__main__":
  main()
