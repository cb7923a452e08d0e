"""The real trainer across devices and processes (jaxclf/train/loop.py, jaxclf/train/distributed.py),
on the tests' tiny config (configs/cnn.py:tiny: cnn_tiny, 512 Fashion-MNIST images per split):

  1 device (this process) vs 4 simulated devices (a subprocess): the same loss curve, step by step;
  1 process vs 2 real processes on 127.0.0.1 through `jaxclf train`: the same loss curve and, in
  the checkpoint they wrote, the same params; and (slow) one of them killed with -9 mid-training:
  the survivor names the lost process, and rerunning resumes from the 2-process checkpoint;
  bad multi-process input: one clear error each, before any compute;
  gradient accumulation through the config: the large batch's update.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxclf.cli import SUPERVISED_ENV
from jaxclf.config import load_config
from jaxclf.train.checkpoints import load_inference
from jaxclf.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{ROOT}/configs/cnn.py:tiny"
# 20 steps (8 per epoch), a loss logged at every one, a checkpoint every 4; no end-of-run test
# pass or calibration (nothing here reads them).
# The default's whitening stem on: each process fits it (process 0's filters are broadcast),
# and any disagreement would show in the curve from step 1.
BASE = ["model.kwargs.stem=whiten", "optimizer.learning_rate=0.05", "train.num_epochs=3",
        "train.max_steps=20", "periodic.log=1 steps", "periodic.checkpoint=4 steps",
        "train.calibrate=false", "evals.test.enabled=false"]
HEARTBEAT_S = 5
# How long a test waits for a process to end on its own: 24 heartbeat (and init) timeouts. A
# job that missed a lost process or a missing peer would run (or wait) on for far longer; no
# loaded machine stretches a 5 s timeout to 120 s by accident.
END_WITHIN_S = 24 * HEARTBEAT_S

# How far two correct runs of the same 20 steps may drift apart when only the order of float32
# sums differs (4 devices or 2 processes each sum their share of the batch, then all-reduce; on
# another CPU, oneDNN and XLA pick other kernels for batch 16 than for 64). Derived, not fitted:
# - a reordered float32 sum of n terms moves by about sqrt(n) * eps relative (eps = 2**-23 =
#   1.19e-7; the rounding errors add as a random walk; n * eps is the never-reached worst case);
# - the longest reductions in a step of cnn_tiny at batch 64 are the first layer's BatchNorm
#   statistics and weight gradient, over 64 images x 28 x 28 pixels = 50,176 terms: one step's
#   rounding moves its loss, and its update, by ROUNDING = sqrt(50176) * eps = 2.7e-5 relative;
# - an update u that is off by ROUNDING * |u| moves the next losses by about ROUNDING * lr * |g|^2
#   <= ROUNDING * loss (one step lowers the loss by lr * |g|^2 to first order, never by more than
#   the loss); Nesterov momentum m = 0.9 replays an update's error in every later update: t
#   steps on it has entered the params with weight 1 + m + ... + m**t = (1 - m**(t+1)) / (1 - m)
#   (<= 10; no chaotic growth is assumed, hence the margin below).
# So the loss at step s (its own forward pass, plus every earlier update's error carried by the
# momentum) differs by at most ROUNDING * (1 + sum over t = 1 .. s-1 of (1 - m**(t+1)) / (1 - m)):
# 2.7e-5 at step 1, 7.7e-5 at step 2, 3.2e-3 at step 20. Measured on an AVX-512 machine: 0 at
# steps 1-2, <= 6e-7 to step 10, 6.8e-5 at step 19 (4 devices), 7.1e-5 (2 processes).
# A wrong split is far out: BatchNorm statistics per device (the batch of 64 normalised as 4 x 16,
# which is what train.grad_accum_steps=4 computes) moved the curve by 2.0e-3 and 7.3e-4 at steps
# 1 and 2 (75x and 9.5x the bound), up to 5.4e-2 later.
EPS_F32 = 2.0 ** -23
ROUNDING = math.sqrt(64 * 28 * 28) * EPS_F32
MOMENTUM = 0.9  # configs/cnn.py (nesterov); checked in the one_device fixture


def drift_bound(step: int) -> float:
  """The largest relative difference of the loss at `step` that float32 rounding explains."""
  return ROUNDING * (1 + sum((1 - MOMENTUM ** (t + 1)) / (1 - MOMENTUM) for t in range(1, step)))


def assert_same_curve(curve: dict[int, float], ref: dict[int, float]) -> None:
  assert sorted(curve) == sorted(ref) == list(range(1, 21))
  rel = {s: abs(curve[s] - ref[s]) / abs(ref[s]) for s in ref}
  assert all(rel[s] <= drift_bound(s) for s in ref), {
      s: f"{rel[s]:.1e} > {drift_bound(s):.1e}" for s in ref if rel[s] > drift_bound(s)}


def free_port() -> int:
  from conftest import free_port as worker_port  # noqa: PLC0415  (per-worker port range)
  return worker_port()


def train_cmd(workdir, sets=()) -> list[str]:
  return [sys.executable, "-m", "jaxclf.cli", "train", "--config", TINY, "--workdir", str(workdir),
          *[x for s in [*BASE, *sets] for x in ("--set", s)]]


def env(devices: int = 1, supervised: bool = True) -> dict:
  e = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXCLF_LOGLEVEL": "WARNING",
       "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""}
  e.pop(SUPERVISED_ENV, None)
  if not supervised:  # the trainer itself, not `jaxclf train`'s supervisor around it
    e[SUPERVISED_ENV] = "1"
  return e


def two_process_sets(port: int, process_id: int, **timeouts) -> list[str]:
  t = {"init_timeout_s": 60, "heartbeat_timeout_s": HEARTBEAT_S, **timeouts}
  return [f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
          f"distributed.process_id={process_id}", *[f"distributed.{k}={v}" for k, v in t.items()]]


def loss_curve(workdir) -> dict[int, float]:
  ea = EventAccumulator(os.path.join(workdir, "tb"))
  ea.Reload()
  return {e.step: e.value for e in ea.Scalars("train/loss")}


def leaves(workdir):
  return jax.tree.leaves(load_inference(str(workdir), "latest").variables)


def max_rel_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(np.asarray(y)).max()
                                                                   + 1e-12)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: this process, one CPU device."""
  assert jax.device_count() == 1
  workdir = tmp_path_factory.mktemp("one")
  config = load_config(TINY, BASE, environ={})
  assert config.optimizer.momentum == MOMENTUM and config.optimizer.nesterov  # drift_bound's
  assert config.train.batch_size == 64  # ROUNDING's 64 images
  record = train_and_evaluate(config, str(workdir))
  assert record["final_step"] == 20 and record["topology"]["device_count"] == 1
  return workdir


def test_four_simulated_devices_follow_the_one_device_loss_curve(one_device, tmp_path):
  out = subprocess.run(train_cmd(tmp_path), env=env(devices=4), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.load(open(tmp_path / "run.json"))
  assert record["topology"]["mesh"] == {"data": 4} and record["topology"]["process_count"] == 1
  ref = loss_curve(one_device)
  # The same examples per step, split over 4 devices: the one-device curve to float32 rounding.
  assert_same_curve(loss_curve(tmp_path), ref)
  assert ref[20] < ref[1]  # it trained


def assert_like_one_process(workdir, one_device, segments: int) -> None:
  """A finished 2-process run in `workdir` against the 1-process reference."""
  record = json.load(open(workdir / "run.json"))
  assert record["status"] == "stopped" and record["final_step"] == 20  # max_steps, as the ref
  assert record["topology"] == {**record["topology"], "process_count": 2, "device_count": 2,
                                "mesh": {"data": 2}}
  # Only process 0 writes TensorBoard: one event file per run segment.
  assert len(os.listdir(workdir / "tb")) == segments
  # The same examples per global step: the loss curve is the 1-process one, to float32 rounding
  # (gloo's all-reduce sums in another order than one device does; see drift_bound).
  assert_same_curve(loss_curve(workdir), loss_curve(one_device))
  # The checkpoint both processes wrote, read by this single process, computes the 1-process
  # run's function: its logits on fixed inputs within the step-20 bound (measured 2.5e-4; the
  # reference's own step-16 checkpoint, a stale one, is 0.11 away). Compared as a function, not
  # leaf by leaf: BatchNorm leaves each conv kernel's scale free, and rounding drifts along
  # such directions without changing what the network computes.
  two, ref = (load_inference(str(w), "latest") for w in (workdir, one_device))
  assert two.step == ref.step == 20
  x = np.random.default_rng(0).normal(size=(256, *ref.spec.input_shape)).astype(np.float32)
  got, want = two.raw_logits(x), ref.raw_logits(x)
  assert np.abs(got - want).max() / np.abs(want).max() <= drift_bound(20)
  ref_val = json.load(open(one_device / "run.json"))["metrics"]["val"]
  assert record["metrics"]["val"]["count"] == ref_val["count"] == 512
  assert abs(record["metrics"]["val"]["loss"] - ref_val["loss"]) <= drift_bound(20) * ref_val["loss"]


def run_two(workdir, port: int) -> list[subprocess.CompletedProcess]:
  """Both processes through `jaxclf train` (each supervised), to the end."""
  procs = [subprocess.Popen(train_cmd(workdir, two_process_sets(port, i)), env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
  return outs


def test_two_real_processes_train_like_one(one_device, tmp_path):
  """Coordinator + worker on 127.0.0.1, one CPU device each: a global mesh of 2."""
  run_two(tmp_path, free_port())
  assert json.load(open(tmp_path / "run.json"))["resumed_from_step"] is None
  assert_like_one_process(tmp_path, one_device, segments=1)


@pytest.mark.slow  # two more 2-process launches and a heartbeat timeout
def test_a_killed_process_ends_the_job_and_the_rerun_resumes(one_device, tmp_path):
  """Process 0 runs under `jaxclf train`'s supervisor; process 1 (the bare trainer) is killed
  with -9 once the first checkpoint exists. Process 0 must end non-zero within the heartbeat
  timeout, its last line naming process 1. Rerunning both commands resumes from that
  2-process checkpoint (restored by both) and ends where the 1-process run ended."""
  port = free_port()
  cmds = [train_cmd(tmp_path, two_process_sets(port, i)) for i in (0, 1)]
  p0 = subprocess.Popen(cmds[0], env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
  p1 = subprocess.Popen(cmds[1], env=env(supervised=False), cwd=ROOT,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  latest = tmp_path / "checkpoints" / "latest"
  try:
    deadline = time.monotonic() + 300
    while not (latest.is_dir() and any(d.isdigit() for d in os.listdir(latest))):
      assert p0.poll() is None and p1.poll() is None and time.monotonic() < deadline, \
          p0.stderr.read()[-3000:] if p0.poll() is not None else "no checkpoint in time"
      time.sleep(0.02)
    p1.send_signal(signal.SIGKILL)
    # The event: process 0 ends by itself (its heartbeat timeout), not when this test gives up.
    _, err = p0.communicate(timeout=END_WITHIN_S)
  finally:
    for p in (p0, p1):
      if p.poll() is None:
        p.kill()
  assert p0.returncode != 0, p0.returncode
  last = err.strip().splitlines()[-1]
  assert last.startswith("jaxclf: process 0: process 1 of 2 was lost"), err[-3000:]
  cut = json.load(open(tmp_path / "run.json"))
  # "failed" when Python saw the broken collective before the runtime's abort ended it
  assert cut["status"] in ("running", "failed") and cut["topology"]["process_count"] == 2

  run_two(tmp_path, port)  # the same commands, the same port
  assert 0 < json.load(open(tmp_path / "run.json"))["resumed_from_step"] < 20
  assert_like_one_process(tmp_path, one_device, segments=2)


def test_bad_multi_process_input_is_one_clear_error_before_compute(tmp_path):
  """Three runs at once: a coordinator port that is taken; a global batch that does not split
  over 4 devices; num_processes=2 with one process joining (ends after the init timeout)."""
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = {"port": (two_process_sets(port, 0), env()),
             "batch": (["train.batch_size=30"], env(devices=4)),
             "join": (two_process_sets(free_port(), 0, init_timeout_s=2), env())}
    procs = {name: subprocess.Popen(train_cmd(tmp_path / name, sets), env=e, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (sets, e) in cases.items()}
    # Each ends by itself ("join" after its 2 s init timeout; the others at once): the bound is
    # on waiting for that, generous (END_WITHIN_S after jax's and the trainer's imports).
    outs = {name: p.communicate(timeout=60 + END_WITHIN_S) for name, p in procs.items()}
  assert all(p.returncode != 0 for p in procs.values()), {n: o[0][-500:] for n, o in outs.items()}
  last = {name: out[1].strip().splitlines()[-1] for name, out in outs.items()}
  assert last["port"] == (f"jaxclf: error: distributed.coordinator=127.0.0.1:{port}: port {port} "
                          "is already in use on this host (another job's coordinator?): choose a "
                          "free port for every process"), last["port"]
  assert last["batch"].startswith("jaxclf: error: train.batch_size=30 is not divisible by the 4 "
                                  "devices"), last["batch"]
  assert last["join"].startswith("jaxclf: process 0: not all 2 processes joined the coordinator "
                                 "at 127.0.0.1:"), last["join"]
  assert "within 2 s" in last["join"]
  # Nothing ran: no run directory at all before jax.distributed joined; after the batch check,
  # no run record and no checkpoint.
  assert not (tmp_path / "port").exists() and not (tmp_path / "join").exists()
  assert not (tmp_path / "batch" / "run.json").exists()
  assert not (tmp_path / "batch" / "checkpoints").exists()


def test_gradient_accumulation_through_the_config_is_the_large_batch(tmp_path):
  """train.grad_accum_steps=4 on batches of 64 (4 micro-batches of 16) ends with the params of
  plain batches of 64, to 1e-5 relative in float32. An MLP without dropout: nothing else in it
  depends on how the batch is split (BatchNorm normalises per micro-batch by design)."""
  mlp = ["model.name=cnn", "model.kwargs.stem=conv", "model.kwargs.layers=[]",
         "model.kwargs.hidden=[32]", "model.kwargs.dropout=0.0", "train.max_steps=6",
         "periodic.checkpoint=6 steps"]
  out = {}
  for k in (1, 4):
    workdir = tmp_path / f"k{k}"
    config = load_config(TINY, [*BASE, *mlp, f"train.grad_accum_steps={k}"], environ={})
    out[k] = train_and_evaluate(config, str(workdir))
    assert out[k]["final_step"] == 6
  assert max_rel_diff(leaves(tmp_path / "k4"), leaves(tmp_path / "k1")) < 1e-5
  assert out[4]["last_train"]["loss"] == pytest.approx(out[1]["last_train"]["loss"], rel=1e-5)
