"""jaxclf.ops.compile_cache: where the persistent XLA compilation cache lives, how it is turned
off, and that a step holding oneDNN FFI calls, compiled in one process, is loaded from the cache
by the next and computes the same result."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxclf.ops import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_dir_follows_the_environment(tmp_path):
  assert compile_cache.cache_dir({"JAXCLF_COMPILATION_CACHE": str(tmp_path)}) == str(tmp_path)
  for off in ("0", "off", "", "false"):
    assert compile_cache.cache_dir({"JAXCLF_COMPILATION_CACHE": off}) is None
  assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/jaxclf/xla"
  assert compile_cache.cache_dir({}).endswith(os.path.join(".cache", "jaxclf", "xla"))


def test_the_write_threshold_follows_the_environment():
  assert compile_cache.min_compile_seconds({}) == 1.0  # JAX's default
  assert compile_cache.min_compile_seconds({"JAXCLF_COMPILATION_CACHE_MIN_S": "0.1"}) == 0.1
  assert compile_cache.min_compile_seconds({"JAXCLF_COMPILATION_CACHE_MIN_S": " 0 "}) == 0.0
  for bad in ("-1", "fast", "nan"):
    with pytest.raises(ValueError, match="JAXCLF_COMPILATION_CACHE_MIN_S="):
      compile_cache.min_compile_seconds({"JAXCLF_COMPILATION_CACHE_MIN_S": bad})


_CHILD = r"""
import json, sys
from jaxclf.ops.compile_cache import enable_compilation_cache
status = enable_compilation_cache(min_compile_s=0)
import jax, jax.numpy as jnp, numpy as np
from jax._src import monitoring
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name))
from jaxclf.ops import onednn
assert onednn.available(), onednn.load_error()
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, 16)), jnp.float32)
f = jax.jit(jax.grad(lambda x, w: (onednn.conv2d(x, w, groups=16) ** 2).sum(), argnums=(0, 1)))
dx, dw = f(x, w)
print(json.dumps({"status": status, "dw": np.asarray(dw).tolist(),
                  "hit": any("cache_hits" in h for h in hits)}))
"""


def _child(env):
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_step_with_onednn_calls_is_reused_from_the_cache(tmp_path):
  env = {**os.environ, "JAXCLF_COMPILATION_CACHE": str(tmp_path / "xla")}
  first = _child(env)
  assert first["status"]["enabled"] and first["status"]["dir"] == str(tmp_path / "xla")
  assert not first["hit"] and os.listdir(tmp_path / "xla"), "nothing was written to the cache"
  second = _child(env)
  assert second["hit"], "the second process compiled again instead of loading the cache"
  assert second["dw"] == first["dw"]  # the cached executable calls the same oneDNN kernels


def test_turned_off_writes_nothing(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update({"JAXCLF_COMPILATION_CACHE": "0", "XDG_CACHE_HOME": str(tmp_path)})
  got = _child(env)
  assert not got["status"]["enabled"] and not (tmp_path / "jaxclf").exists()


def test_entries_of_an_unbounded_cache_do_not_break_the_bounded_one(tmp_path):
  """A directory filled by an unbounded cache (no -atime files) is stamped on enable, so the
  bounded cache's eviction scan finds a stamp for every entry and the next write succeeds."""
  (tmp_path / "xla").mkdir()
  (tmp_path / "xla" / "jit_old-0123-cache").write_bytes(b"an entry from an older run")
  env = {**os.environ, "JAXCLF_COMPILATION_CACHE": str(tmp_path / "xla")}
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Error writing persistent compilation cache" not in out.stderr, out.stderr[-2000:]
  names = os.listdir(tmp_path / "xla")
  assert "jit_old-0123-atime" in names
  assert sum(n.endswith("-cache") for n in names) > 1  # this process's step was written too
