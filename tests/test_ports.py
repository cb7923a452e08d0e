"""Ports and shared-memory names for servers the suite starts, safe under parallel workers.

scripts/test.sh runs the suite on pytest-xdist workers; each worker's servers (Triton, moto, MLflow,
PostgreSQL, gateways, the GCS emulator) take ports from the worker's own JAXCLF_PORT_RANGE (set in
tests/conftest.py), and each Triton server gets its own python-backend shared-memory prefix.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import PORTS_PER_WORKER, ROOT, WORKER_INDEX, free_port
from jaxclf.export import triton_server
from jaxclf.export.triton_server import TritonServerError, port_range, shm_prefix_args

_ALLOCATE = ("import sys; from jaxclf.export.triton_server import free_port; "
             "print(' '.join(str(free_port()) for _ in range(int(sys.argv[1]))))")


def _allocate(count: int, spec: str) -> list[int]:
  env = {**os.environ, "JAXCLF_PORT_RANGE": spec}
  r = subprocess.run([sys.executable, "-c", _ALLOCATE, str(count)], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return [int(p) for p in r.stdout.split()]


def test_this_workers_range_is_its_own_and_below_the_ephemeral_ports():
  lo, hi = port_range()
  assert hi - lo + 1 == PORTS_PER_WORKER
  assert lo == int(os.environ.get("JAXCLF_TEST_PORT_BASE", "20000")) + WORKER_INDEX * PORTS_PER_WORKER
  with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    ephemeral_lo = int(f.read().split()[0])
  assert hi < ephemeral_lo, (f"worker ports {lo}-{hi} overlap the ephemeral ports from {ephemeral_lo}: "
                             "set JAXCLF_TEST_PORT_BASE lower")  # outgoing connections take those
  assert lo <= free_port() <= hi


def test_one_process_hands_out_every_port_of_its_range_once_before_wrapping():
  base = int(os.environ.get("JAXCLF_TEST_PORT_BASE", "20000"))
  lo, hi = base - 10, base - 3  # just below every worker's range: no test server is there
  ports = _allocate(9, f"{lo}-{hi}")
  assert sorted(ports[:8]) == list(range(lo, hi + 1))
  assert ports[8] == ports[0]  # the ninth wraps around to the first


def test_a_port_someone_listens_on_is_skipped(monkeypatch):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    monkeypatch.setenv("JAXCLF_PORT_RANGE", f"{port}-{port + 1}")
    monkeypatch.setattr(triton_server, "_range_cursor", {(port, port + 1): 0})
    assert triton_server.free_port() == port + 1
    monkeypatch.setenv("JAXCLF_PORT_RANGE", f"{port}-{port}")
    with pytest.raises(TritonServerError, match=f"no free port in JAXCLF_PORT_RANGE={port}-{port}"):
      triton_server.free_port()


@pytest.mark.parametrize("spec", ["20000", "2-3", "30000-20000", "a-b", "20000-70000"])
def test_a_bad_range_is_one_clear_error(monkeypatch, spec):
  monkeypatch.setenv("JAXCLF_PORT_RANGE", spec)
  with pytest.raises(TritonServerError, match=r"JAXCLF_PORT_RANGE=.*expected LO-HI"):
    triton_server.free_port()


def test_each_triton_server_gets_its_own_shared_memory_prefix(tmp_path):
  server = triton_server.TritonServer(str(tmp_path), models=[])
  prefix = f"--backend-config=python,shm-region-prefix-name=jaxclf_{os.getpid()}_{server.http_port}_"
  assert prefix in server.command()
  assert shm_prefix_args([], "11_20001") != shm_prefix_args([], "12_20001")
  own = ["--backend-config=python,shm-region-prefix-name=mine_"]
  assert shm_prefix_args(own, "11_20001") == []  # the caller's own choice wins


def test_a_stopped_server_removes_the_regions_its_killed_stubs_left_and_no_others(tmp_path):
  server = triton_server.TritonServer(str(tmp_path), models=[])
  other = triton_server.TritonServer(str(tmp_path), models=[])
  left = f"/dev/shm/jaxclf_{server.shm_tag}_left-by-a-killed-stub"
  kept = f"/dev/shm/jaxclf_{other.shm_tag}_in-use-by-another-server"
  for path in (left, kept):
    with open(path, "wb") as f:
      f.write(b"\0")
  try:
    server._remove_leftover_shm()
    assert not os.path.exists(left)
    assert os.path.exists(kept)
  finally:
    for path in (left, kept):
      if os.path.exists(path):
        os.unlink(path)


def _affinity_after_conftest(**env: str) -> list[int]:
  """The CPUs a fresh process may run on once it has imported tests/conftest.py, with `env`."""
  code = ("import json, os, sys; sys.path.insert(0, 'tests'); import conftest; "
          "print(json.dumps(sorted(os.sched_getaffinity(0))))")
  base = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
  r = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpus_per_worker_pins_each_worker_to_its_own_cpus():
  cpus = sorted(os.sched_getaffinity(0))
  assert _affinity_after_conftest(PYTEST_XDIST_WORKER="gw0", JAXCLF_TEST_CPUS_PER_WORKER="1") == [
      cpus[0]]
  assert _affinity_after_conftest(PYTEST_XDIST_WORKER="gw1", JAXCLF_TEST_CPUS_PER_WORKER="1") == [
      cpus[1 % len(cpus)]]


def test_a_serial_run_or_the_xdist_controller_is_not_pinned():
  # the controller's mask is what its workers inherit: pinned, both would share its CPUs
  assert _affinity_after_conftest(JAXCLF_TEST_CPUS_PER_WORKER="1") == sorted(os.sched_getaffinity(0))


def test_the_longest_first_schedule_names_only_files_that_exist():
  """conftest.LONGEST_FIRST orders the files pytest-xdist hands out; a renamed file would silently
  fall back to the alphabetical tail."""
  from conftest import LONGEST_FIRST
  here = os.path.dirname(os.path.abspath(__file__))
  missing = [n for n in LONGEST_FIRST if not os.path.isfile(os.path.join(here, n))]
  assert not missing and len(set(LONGEST_FIRST)) == len(LONGEST_FIRST), missing
