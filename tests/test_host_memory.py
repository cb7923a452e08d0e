"""jaxclf/ops/host_memory.py: a large block freed by a worker thread is reused without page faults.

Each case runs in a fresh interpreter (the settings are process-wide and must precede the threads),
and counts the minor page faults of the second of two malloc/touch/free rounds of a 160 MB block
in a new thread: the shape of XLA CPU's per-step scratch buffer."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import ctypes, json, resource, sys, threading
sys.path.insert(0, sys.argv[1])
from jaxclf.ops import host_memory
status = host_memory.reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 160 << 20, []
def one_round():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(2):
  t = threading.Thread(target=one_round); t.start(); t.join()
print(json.dumps({"status": status, "again": host_memory.reuse_freed_memory() is status,
                  "faults": faults}))
"""


def _probe(**env):
  e = {k: v for k, v in os.environ.items()
       if k not in ("JAXCLF_HOST_MALLOC", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
  e.update(env)
  out = subprocess.run([sys.executable, "-c", PROBE, ROOT], env=e, capture_output=True, text=True,
                       check=True, timeout=60)
  return json.loads(out.stdout)


def _glibc():
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").gnu_get_libc_version
    return True
  except (OSError, AttributeError):
    return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_freed_scratch_comes_back_without_page_faults():
  system = _probe(JAXCLF_HOST_MALLOC="system")
  reuse = _probe()
  assert system["status"]["mode"] == "system" and "JAXCLF_HOST_MALLOC" in system["status"]["why"]
  assert reuse["status"]["mode"] == "reuse" and reuse["again"]
  pages = (160 << 20) // 4096
  # The system allocator maps the block afresh each round: every page faults again.
  assert system["faults"][1] > 0.9 * pages
  # Kept in the heap: the second round touches pages that are already there.
  assert reuse["faults"][1] < 0.05 * pages


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_the_users_own_glibc_setting_is_left_alone():
  out = _probe(MALLOC_ARENA_MAX="4")
  assert out["status"]["mode"] == "system"
  assert "MALLOC_ARENA_MAX" in out["status"]["why"]
