"""Builds the optional oneDNN extension (convolution, batch norm, max pool), jaxclf/ops/_onednn_conv*.so (see
jaxclf/ops/onednn.py). Everything else about the package is in pyproject.toml.

The extension needs oneDNN's headers and library (PyPI `onednn-devel-cpu-gomp` / `onednn-cpu-gomp`,
requirements/onednn.txt, which install into the environment's include/ and lib/) and XLA's FFI
headers (shipped in jaxlib, `jax.ffi.include_dir()`). When either is missing the build warns and
skips it, and jaxclf uses the pure-JAX convolution. scripts/setup.sh installs both and builds it:

  .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
"""
from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["jaxclf/ops/onednn_conv.cc", "jaxclf/ops/onednn_norm_pool.cc"]


def _prefixes() -> list[str]:
  out = []
  # The environment's own prefix (where the onednn wheels install), or ONEDNN_ROOT for a
  # oneDNN 3.x installed elsewhere.
  for p in (os.environ.get("ONEDNN_ROOT"), sys.prefix, sys.base_prefix):
    if p and p not in out:
      out.append(p)
  return out


def _find_onednn():
  """(include_dir, lib_dir) of a oneDNN 3.x install, or None."""
  for p in _prefixes():
    inc, lib = os.path.join(p, "include"), os.path.join(p, "lib")
    ver = os.path.join(inc, "oneapi", "dnnl", "dnnl_version.h")
    if (os.path.exists(os.path.join(inc, "dnnl.hpp")) and os.path.exists(ver)
        and os.path.exists(os.path.join(lib, "libdnnl.so.3"))):
      with open(ver) as f:
        if "#define DNNL_VERSION_MAJOR 3" in f.read():
          return inc, lib
  return None


def _find_ffi_include():
  """jaxlib/include (XLA FFI headers) without importing jax."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  for loc in spec.submodule_search_locations:
    inc = os.path.join(loc, "include")
    if os.path.exists(os.path.join(inc, "xla", "ffi", "api", "ffi.h")):
      return inc
  return None


class OptionalBuildExt(build_ext):
  """Builds the oneDNN extension when its dependencies are there; warns and skips otherwise."""

  def run(self):
    # setuptools' build_ext.run() clears self.inplace while building, then copies: remember it.
    self._final_inplace = bool(self.inplace)
    super().run()

  def build_extensions(self):
    onednn, ffi_inc = _find_onednn(), _find_ffi_include()
    if onednn is None or ffi_inc is None:
      missing = [n for n, v in (("oneDNN 3.x headers+libdnnl.so.3 (pip install -r "
                                 "requirements/onednn.txt)", onednn),
                                ("jaxlib's XLA FFI headers", ffi_inc)) if v is None]
      self.warn("jaxclf: skipping the oneDNN conv extension, not found: " + "; ".join(missing)
                + ". jaxclf falls back to XLA's convolution.")
      self.extensions = []  # nothing to copy in place or to put in the wheel
      return
    inc, lib = onednn
    here = os.path.dirname(os.path.abspath(__file__))
    for ext in self.extensions:
      pkg = ext.name.split(".")[:-1]
      # Where the .so will finally live: the source tree for an editable install (`pip install
      # -e .`, setuptools builds in a temp dir and copies it back), else site-packages.
      if getattr(self, "editable_mode", False) or getattr(self, "_final_inplace", self.inplace):
        out_dir = os.path.join(here, *pkg)
      else:
        out_dir = os.path.join(sysconfig.get_paths()["platlib"], *pkg)
      rel = os.path.relpath(lib, out_dir)
      ext.include_dirs += [inc, ffi_inc]
      ext.library_dirs += [lib]
      ext.libraries += ["dnnl", "gomp"]
      # $ORIGIN-relative first (the tree can move with its venv), then the absolute venv lib.
      ext.extra_link_args += [f"-Wl,-rpath,$ORIGIN/{rel}", f"-Wl,-rpath,{lib}"]
    try:
      super().build_extensions()
    except Exception as e:  # a compiler problem must not break the install
      self.warn(f"jaxclf: building the oneDNN conv extension failed ({e}); "
                "jaxclf falls back to XLA's convolution.")
      self.extensions = []


ext = Extension(
    "jaxclf.ops._onednn_conv",
    sources=SOURCES,
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-w"],
    depends=["setup.py", "jaxclf/ops/onednn_common.h"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt})
