"""Keep freed host memory mapped, so XLA CPU's per-step scratch is not page-faulted in every step.

Why: XLA's CPU runtime allocates each execution's temporary buffer (all of a train step's
activations at once: 154 MB for configs/cnn.py at batch 256) from one of its worker threads and
frees it when the step ends. glibc serves a block that large with a fresh mmap and returns it with
munmap, and a thread's own arena falls back to mmap for it whatever the thresholds say. So every
step touched 37,600 new pages (`bench/train.py --conv-impl onednn_system_malloc` is the before): the kernel zeroes each one, and
on 2 cores that cost 17-20% of the step (339 vs 422 ms, 325 vs 388 ms, alternating processes).
Scanning steps inside one dispatch hid it (one scratch block per scan), which is how it was found.

`reuse_freed_memory()` asks glibc, through mallopt(3), for one arena (M_ARENA_MAX=1: threads
allocate from the main heap, which can grow with brk and keep what is freed), no mmap for large
blocks (M_MMAP_MAX=0) and no trimming of the heap top (M_TRIM_THRESHOLD=-1). A step's
scratch then comes back from the heap already mapped: 0 page faults per step when steps are
scanned, about 6,000 (mostly small outputs) otherwise. Resident memory stays near its peak
(about +240 MB for the default CNN) instead of dropping between steps; that is the trade.
Trimming used to start at 1 GiB of free heap top (the largest value mallopt's int takes is 2 GiB).
EfficientNet-Lite0 at 224 px, batch 16, has a 1.17 GiB step scratch (XLA's memory_analysis), so
the heap top was handed back with brk and faulted in again every step: 123k-308k minor faults
per step (0.5-1.2 GB of zeroed pages) against 0 at 128 px (0.77 GiB scratch); with trimming off,
61k (the rest are thread-stack and oneDNN buffers), measured with getrusage around the timed
steps (strace showed the brk shrink each step).

It must run before the JAX backend starts its threads (a thread that has already taken an arena
keeps it), so `jaxclf train|sweep|evaluate|export` and `python -m jaxclf.main` call it before
anything else; calling it again is a no-op. The servers (`jaxclf serve`) do not: their request
threads would contend for the one arena, and their inference runs in onnxruntime, not XLA.
`JAXCLF_HOST_MALLOC=system` turns it off, and so does the user's own glibc setting
(`MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` with malloc tunables), which is left alone. Not glibc
(musl, macOS): nothing to do, and it says so. jax-free: the serving and Beam environments can
import it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = -1  # never trim (glibc: -1 turns trimming off)

_status: dict[str, Any] | None = None


def _libc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    return libc, libc.gnu_get_libc_version().decode()
  except (OSError, AttributeError):
    return None, None


def _user_setting(environ) -> str | None:
  if environ.get("JAXCLF_HOST_MALLOC", "").lower() == "system":
    return "JAXCLF_HOST_MALLOC=system"
  for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
    if name in environ:
      return name
  if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    return "GLIBC_TUNABLES"
  return None


def reuse_freed_memory(environ=None) -> dict[str, Any]:
  """Applies the settings once per process; returns what was done (recorded in run.json)."""
  global _status
  if _status is not None:
    return _status
  environ = os.environ if environ is None else environ
  libc, version = _libc()
  left_to = _user_setting(environ)
  if libc is None:
    _status = {"mode": "system", "why": "not glibc: the platform's allocator is used as is"}
  elif left_to:
    _status = {"mode": "system", "why": f"left to the user's {left_to}", "glibc": version}
  else:
    ok = all(libc.mallopt(opt, value) == 1 for opt, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
    _status = {"mode": "reuse" if ok else "system", "glibc": version,
               "settings": {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0,
                            "M_TRIM_THRESHOLD": TRIM_THRESHOLD_BYTES}}
    if not ok:
      _status["why"] = "mallopt refused a setting"
  return _status


def status() -> dict[str, Any]:
  """What `reuse_freed_memory` did in this process ({'mode': 'system'} if it never ran)."""
  return _status or {"mode": "system", "why": "reuse_freed_memory() was not called"}
