"""JAX's persistent compilation cache for every jaxclf command that compiles.

Why: a run's fixed cost is compilation. On 2 CPU cores, EfficientNet-Lite0 at 128 px spent about
10 s compiling the parameter initialisers (`create_train_state`'s jitted `model.init`: thousands
of RNG ops; the forward pass itself is dead code there) and 6 s compiling the train step, before
its first image; eval and feature steps add more. PyTorch has no such cost. With the cache, the
second run of the same config (another seed, a resume, the next sweep trial, evaluate after
train) loads those executables from disk: init 10.5 -> 3.1 s, first step 6.1 -> 2.3 s in one
measurement (what remains is Python tracing, which no cache skips).

Where: $JAXCLF_COMPILATION_CACHE if set (a directory; `0`, `off` or empty turn the cache off),
else $XDG_CACHE_HOME/jaxclf/xla, else ~/.cache/jaxclf/xla. The key is JAX's own: the program,
jax/jaxlib versions, the backend and XLA flags, so a changed model or upgrade compiles afresh.
The oneDNN calls (jaxclf/ops/onednn.py) are FFI custom calls resolved by name when an executable
loads, so cached steps use whatever extension this process registered. Only compilations that
took at least `min_compile_s` are written (JAX's default threshold: one second, or
$JAXCLF_COMPILATION_CACHE_MIN_S), so tiny jits do not litter a user's directory; the test suite
lowers it, since it compiles the same hundreds of small programs in every run. The cache is
bounded (`max_bytes`, 4 GiB by default; JAX evicts the least recently used entries), and bounding it also turns on JAX's file lock around every read
and write, so several processes (a sweep's workers, a test suite's subprocesses) can share it:
without the lock JAX writes entries in place and a reader could see half of one.
A cache on a disk shared between machines with different CPUs is not a good idea: XLA CPU code is
compiled for the host's instruction set (AVX-512 or not), so keep it machine-local (the default).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

_status: dict[str, Any] | None = None


def cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
  """The directory the cache uses under `environ`, or None when it is turned off."""
  env = os.environ if environ is None else environ
  if "JAXCLF_COMPILATION_CACHE" in env:
    value = env["JAXCLF_COMPILATION_CACHE"].strip()
    return None if value.lower() in ("", "0", "off", "false", "no") else os.path.expanduser(value)
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxclf", "xla")


MAX_BYTES = 4 << 30


def min_compile_seconds(environ: Mapping[str, str] | None = None) -> float:
  """$JAXCLF_COMPILATION_CACHE_MIN_S (seconds, >= 0), else JAX's default of one second."""
  env = os.environ if environ is None else environ
  value = env.get("JAXCLF_COMPILATION_CACHE_MIN_S", "").strip()
  if not value:
    return 1.0
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if not seconds >= 0:  # also NaN
    raise ValueError(f"JAXCLF_COMPILATION_CACHE_MIN_S={value!r}: expected seconds >= 0")
  return seconds


def enable_compilation_cache(environ: Mapping[str, str] | None = None,
                             min_compile_s: float | None = None,
                             max_bytes: int = MAX_BYTES) -> dict[str, Any]:
  """Points JAX's persistent compilation cache at `cache_dir()`; idempotent. Returns what it did
  ({'dir': ..., 'enabled': bool, 'why': ...}), which the run record keeps. `min_compile_s`:
  default `min_compile_seconds(environ)`."""
  global _status
  if _status is not None:
    return _status
  if min_compile_s is None:
    min_compile_s = min_compile_seconds(environ)
  path = cache_dir(environ)
  if path is None:
    _status = {"enabled": False, "dir": None, "why": "JAXCLF_COMPILATION_CACHE turns it off"}
    return _status
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a read-only home must not stop training: compile as before
    _status = {"enabled": False, "dir": path, "why": f"cannot create {path}: {e.strerror}"}
    return _status
  _stamp_unstamped_entries(path)
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
  jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
  _status = {"enabled": True, "dir": path, "why": "persistent XLA compilation cache"}
  return _status


def _stamp_unstamped_entries(path: str) -> None:
  """Gives every entry without one the access-time file that JAX's bounded cache keeps beside it.
  Entries written by an unbounded cache (an older jaxclf, plain JAX) have none, and the bounded
  cache's eviction scan reads one for every entry: without this, every later write fails with a
  FileNotFoundError warning. The stamp is the entry's mtime, so old entries are evicted first."""
  try:
    names = set(os.listdir(path))
  except OSError:
    return
  for name in names:
    if name.endswith("-cache") and name[:-len("-cache")] + "-atime" not in names:
      try:
        mtime_ns = os.stat(os.path.join(path, name)).st_mtime_ns
        with open(os.path.join(path, name[:-len("-cache")] + "-atime"), "wb") as f:
          f.write(mtime_ns.to_bytes(8, "little"))
      except OSError:  # removed meanwhile, or a read-only cache: JAX copes with both
        pass


def compilation_cache_status() -> dict[str, Any]:
  """What `enable_compilation_cache` did in this process."""
  return _status or {"enabled": False, "dir": None, "why": "enable_compilation_cache() not called"}
