"""The serving venv (.venv-serve, built by scripts/setup_serving_env.sh): where tritonserver, its
backends, the interpreter and the shared libraries they need are, and the environment to run them in
(LD_LIBRARY_PATH = interpreter LIBDIR + nvidia_pytriton.libs, the venv's bin first on PATH).

This module imports neither jax nor onnx: it runs in both the training and the serving venv.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
from typing import Mapping

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServingEnvError(RuntimeError):
  """The serving venv (tritonserver, python backend) is missing or incomplete."""


def serving_venv_dir(venv: str | None = None) -> str:
  return os.path.abspath(venv or os.environ.get("JAXCLF_SERVING_VENV")
                         or os.path.join(REPO_ROOT, ".venv-serve"))


@dataclasses.dataclass(frozen=True)
class ServingEnv:
  """Paths of the serving venv: the interpreter, tritonserver, backends and shared libraries."""
  venv: str
  python: str
  site_packages: str
  tritonserver: str
  backend_dir: str
  lib_dirs: tuple[str, ...]
  perf_analyzer: str

  @classmethod
  def find(cls, venv: str | None = None) -> "ServingEnv":
    venv = serving_venv_dir(venv)
    fix = "build it with scripts/setup_serving_env.sh"
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
      raise ServingEnvError(f"serving venv {venv} does not exist; {fix}")
    sites = sorted(glob.glob(os.path.join(venv, "lib", "python*", "site-packages")))
    if not sites:
      raise ServingEnvError(f"{venv} has no site-packages; {fix}")
    site = sites[-1]
    server = os.path.join(site, "pytriton", "tritonserver", "bin", "tritonserver")
    backends = os.path.join(venv, "triton", "backends")
    for path, what in ((server, "tritonserver (nvidia-pytriton)"),
                       (os.path.join(backends, "python", "triton_python_backend_stub"),
                        "the python backend stub")):
      if not os.path.isfile(path):
        raise ServingEnvError(f"{what} not found at {path}; {fix}")
    libdir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # LIBDIR first: otherwise Debian's libpython3.11 is found instead of the venv's interpreter's,
    # and python models that use multiprocessing break.
    libs = (libdir, os.path.join(site, "nvidia_pytriton.libs"), os.path.join(venv, "triton", "lib"))
    return cls(venv, python, site, server, backends, libs,
               os.path.join(venv, "bin", "perf_analyzer"))

  def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.lib_dirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([os.path.join(self.venv, "bin"), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env
