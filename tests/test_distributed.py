"""jax.distributed on this machine: real processes on 127.0.0.1 (coordinator + worker, CPU devices,
Gloo collectives), their global batches, and how a failed job ends (jaxclf/train/distributed.py).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

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
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("dist") / "worker.py"
  path.write_text(WORKER.format(repo=REPO))
  return str(path)


def start(worker: str, settings: dict, steps: int = 6, mode: str = "run") -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, worker, json.dumps(settings), str(steps), mode],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result(p: subprocess.Popen, timeout: float = 120) -> dict:
  out, err = p.communicate(timeout=timeout)
  assert p.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


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


def test_each_process_reads_its_slice_of_one_global_order():
  order = np.random.default_rng(3).permutation(100)
  for step in range(3):
    parts = [dist.local_indices(order, step, 20, p, 4) for p in range(4)]
    assert all(len(x) == 5 for x in parts)
    np.testing.assert_array_equal(np.concatenate(parts), order[step * 20:(step + 1) * 20])


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


def test_two_real_processes_train_like_one(worker):
  """Same global batches, same steps: two processes end with the single process's weights."""
  one = result(start(worker, {}))
  procs = [start(worker, s) for s in two(worker)]
  both = [result(p) for p in procs]
  for r in both:
    np.testing.assert_allclose(r["w"], one["w"], rtol=1e-5, atol=1e-6)
    assert r["topology"]["process_count"] == 2 and r["topology"]["device_count"] == 2
    assert r["topology"]["mesh"] == {"data": 2}
  assert {r["topology"]["process_index"] for r in both} == {0, 1}
  assert one["topology"]["process_count"] == 1


@pytest.mark.parametrize("lost", [1, 0])
def test_a_killed_process_ends_the_job_with_one_line_naming_it(worker, lost):
  settings = two(worker, heartbeat_timeout_s=5)
  procs = [start(worker, s, mode="hang") for s in settings]
  try:
    for p in procs:  # both are stepping together before the kill
      while not (p.stdout.readline() or "").startswith("step 3"):
        assert p.poll() is None, p.stderr.read()[-3000:]
    procs[lost].send_signal(signal.SIGKILL)
    survivor = procs[1 - lost]
    t0 = time.monotonic()
    _, err = survivor.communicate(timeout=60)
    waited = time.monotonic() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert survivor.returncode != 0 and waited < 5 + 20, (survivor.returncode, waited)
  why = dist.explain_failure(err, dist.Settings.from_config(settings[1 - lost]))
  assert why is not None, err[-3000:]
  if lost == 1:
    assert "process 1 of 2 was lost" in why
  else:
    assert "lost the coordinator (process 0" in why


def test_too_few_processes_joining_is_explained(worker):
  settings = two(worker, num_processes=3, init_timeout_s=5)[:2]
  procs = [start(worker, s) for s in settings]
  errs = [p.communicate(timeout=90)[1] for p in procs]
  assert all(p.returncode != 0 for p in procs)
  why = dist.explain_failure(errs[0], dist.Settings.from_config(settings[0]))
  assert why is not None and "not all 3 processes joined" in why, errs[0][-3000:]


def test_the_supervisor_prints_the_explanation_last(worker, capfd):
  settings = two(worker, num_processes=3, init_timeout_s=5)[:2]
  other = start(worker, settings[1])
  rc = dist.run_supervised([sys.executable, worker, json.dumps(settings[0]), "6", "run"],
                           dist.Settings.from_config(settings[0]),
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
  other.communicate(timeout=90)
  assert rc != 0
  last = capfd.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("jaxclf: process 0: not all 3 processes joined"), last
