"""jax.distributed on this machine: the settings, the per-process data split, and how a job ends
when its coordinator dies (real processes on 127.0.0.1, a toy SGD; jaxclf/train/distributed.py).
The trainer itself across processes (equivalence, a killed worker, too few joining, a port in
use): tests/test_distributed_trainer.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxclf.train import distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A data-parallel SGD on a linear model: every process draws the same seeded global order and
# feeds only its rows of each global batch; the mesh spans every process's devices.
WORKER = r'''
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from jaxclf.train import distributed as dist
settings = dist.Settings.from_config(json.loads(sys.argv[1]))
steps, hang = int(sys.argv[2]), sys.argv[3] == "hang"
dist.initialize(settings)
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
rows, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 4)).astype(np.float32)
y = x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)
order = rng.permutation(256)
GLOBAL = 32
@jax.jit
def step(w, xb, yb):
  g = jax.grad(lambda w: jnp.mean((xb @ w - yb) ** 2))(w)
  return w - 0.1 * g
w = jax.device_put(jnp.zeros(4, jnp.float32), repl)
for i in range(steps if not hang else 10**6):
  idx = dist.local_indices(order, i % 8, GLOBAL, jax.process_index(), jax.process_count())
  xb = jax.make_array_from_process_local_data(rows, x[idx])
  yb = jax.make_array_from_process_local_data(rows, y[idx])
  w = step(w, xb, yb)
  if hang:
    print("step", i, flush=True); time.sleep(0.05)
print(json.dumps({{"w": np.asarray(jax.device_get(w)).tolist(),
                  "topology": dist.topology(mesh)}}), flush=True)
'''


def free_port() -> int:
  from conftest import free_port as worker_port  # noqa: PLC0415  (per-worker port range)
  return worker_port()


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("dist") / "worker.py"
  path.write_text(WORKER.format(repo=REPO))
  return str(path)


def start(worker: str, settings: dict, steps: int = 6, mode: str = "run") -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, worker, json.dumps(settings), str(steps), mode],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def two(worker: str, **extra) -> list[dict]:
  base = {"coordinator": f"127.0.0.1:{free_port()}", "num_processes": 2,
          "init_timeout_s": 60, "heartbeat_timeout_s": 10, **extra}
  return [{**base, "process_id": i} for i in (0, 1)]


def test_settings_are_checked_before_any_compute():
  bad = [({"num_processes": 2}, "needs distributed.coordinator"),
         ({"coordinator": "127.0.0.1", "num_processes": 2}, "expected 'host:port'"),
         ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "must be in 0..1"),
         ({"num_processes": 0}, "must be >= 1"),
         ({"coordinator": "h:1", "num_processes": 2, "heartbeat_timeout_s": 0}, ">= 1 second"),
         ({"coordinater": "h:1"}, "unknown key")]
  for section, message in bad:
    with pytest.raises(dist.DistributedError, match=message):
      dist.Settings.from_config(section)
  assert not dist.Settings.from_config({}).enabled
  with pytest.raises(dist.DistributedError, match="not divisible by the 4 devices"):
    dist.check_global_batch(30, 4)


def test_the_runtime_logs_of_a_failed_job_become_one_line():
  """The lines jax 0.10's coordination service and Gloo print (taken from real runs)."""
  s = dist.Settings.from_config({"coordinator": "127.0.0.1:8476", "num_processes": 2,
                                 "heartbeat_timeout_s": 5})
  lost = ("Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection "
          "closed by peer [127.0.0.1]:28068\nE1201 coordination_service.cc:1549] Use error "
          "polling to propagate the following error to all tasks: UNAVAILABLE: The following "
          "tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.")
  assert dist.explain_failure(lost, s).startswith("process 0: process 1 of 2 was lost (no "
                                                  "heartbeat for 5 s)")
  assert "a peer process was lost" in dist.explain_failure(lost.split("\n")[0], s)
  assert dist.explain_failure("Traceback ... ValueError: something else", s) is None


def test_each_process_reads_its_slice_of_one_global_order():
  order = np.random.default_rng(3).permutation(100)
  for step in range(3):
    parts = [dist.local_indices(order, step, 20, p, 4) for p in range(4)]
    assert all(len(x) == 5 for x in parts)
    np.testing.assert_array_equal(np.concatenate(parts), order[step * 20:(step + 1) * 20])


@pytest.mark.parametrize("on_device", [True, False])
def test_each_trainer_process_reads_its_rows_of_every_global_batch(on_device):
  """The trainer's input (jaxclf/train/inputs.py), in memory and through Grain: the local batches
  of processes 0 and 1 of 2, stacked, are the one-process batches, step by step, augmentation
  included; and the trainer's global batch rule names the field."""
  from jaxclf.config import load_config
  from jaxclf.data import pipeline, transforms
  from jaxclf.data.dataset import load_dataset
  from jaxclf.train import inputs
  from jaxclf.train.loop import create_preprocess_spec
  # The full recipe's augmentation (configs/cnn.py:tiny trains without it), so it is checked too.
  config = load_config(f"{REPO}/configs/cnn.py:tiny", ["augment.translate=2", "augment.hflip=true"],
                       environ={})
  dataset = load_dataset(config.data)
  split, spec = dataset.split("train"), create_preprocess_spec(config, dataset.class_names)
  aug = transforms.AugmentSpec.from_config(config.augment)

  def batches(p, n):
    ti = inputs.TrainInput(split, spec, aug, 64, len(split.labels) // 64, 0, "shuffle",
                           on_device=on_device, read_threads=0, prefetch=1,
                           grain_transform=pipeline.TrainTransform(spec, aug, 10**7, None),
                           process_index=p, process_count=n)
    assert ti.on_device == on_device and inputs.use_device_path("auto", split, spec, aug)
    stream = ti.stream(2, 12, None, None)  # from step 2 on, across an epoch boundary
    return [next(stream) for _ in range(10)]

  whole, parts = batches(0, 1), [batches(p, 2) for p in (0, 1)]
  assert len(whole) == len(parts[0]) == len(parts[1]) == 10
  for step, full in enumerate(whole):
    assert len(parts[0][step]["label"]) == 32
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]),
                                    full[key])
  with pytest.raises(dist.DistributedError, match="grad_accum_steps=4 x the 4 devices"):
    dist.check_global_batch(8, 4, grad_accum_steps=4)


def test_a_coordinator_port_in_use_is_one_clear_error():
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    s = dist.Settings.from_config({"coordinator": f"127.0.0.1:{port}", "num_processes": 2})
    with pytest.raises(dist.DistributedError, match=f"port {port} is already in use"):
      dist.check_coordinator_port(s)
    # only process 0 binds it
    dist.check_coordinator_port(dist.Settings.from_config(
        {"coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": 1}))


def test_a_killed_coordinator_ends_the_job_with_one_line_naming_it(worker):
  """Process 0 (the coordinator) killed; losing process 1 is the trainer test's case
  (tests/test_distributed_trainer.py)."""
  lost, heartbeat_s = 0, 5
  settings = two(worker, heartbeat_timeout_s=heartbeat_s)
  procs = [start(worker, s, mode="hang") for s in settings]
  try:
    for p in procs:  # both are stepping together before the kill
      while not (p.stdout.readline() or "").startswith("step 3"):
        assert p.poll() is None, p.stderr.read()[-3000:]
    procs[lost].send_signal(signal.SIGKILL)
    survivor = procs[1 - lost]
    # The event: the survivor ends by itself (in "hang" mode it would step for hours otherwise).
    # The bound is only on waiting for it: 24 heartbeat timeouts, which no loaded machine
    # reaches by accident.
    _, err = survivor.communicate(timeout=24 * heartbeat_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert survivor.returncode != 0, survivor.returncode
  why = dist.explain_failure(err, dist.Settings.from_config(settings[1 - lost]))
  assert why is not None and "lost the coordinator (process 0" in why, err[-3000:]
