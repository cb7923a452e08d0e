"""Shared by the benches: print a result as JSON and optionally save it."""
import json
import os
import time


def provenance() -> dict:
  """What a committed result needs to be checked later: the commit (and whether the tree had
  uncommitted changes), the UTC date, the command line and the CPU it ran on."""
  import platform
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor()) \
      if os.path.exists("/proc/cpuinfo") else platform.processor()
  return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
          "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "command": " ".join([os.path.relpath(sys.argv[0], root), *sys.argv[1:]]),
          "cpu": cpu, "cores": os.cpu_count()}


def scrub_paths(obj, replacements: dict[str, str]):
  """`obj` (JSON-like) with each key of `replacements` replaced by its value in every string, in
  order: a committed result must not name the folders of the machine it ran on."""
  if isinstance(obj, dict):
    return {k: scrub_paths(v, replacements) for k, v in obj.items()}
  if isinstance(obj, list):
    return [scrub_paths(v, replacements) for v in obj]
  if isinstance(obj, str):
    for old, new in replacements.items():
      obj = obj.replace(old, new)
  return obj


def emit(result: dict, out: str | None) -> None:
  """Prints `result` as JSON and writes it to `out` (if given), with its provenance added."""
  result = {**result, "provenance": provenance()}
  text = json.dumps(result, indent=2)
  print(text)
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      f.write(text)


def timed_steps(step, state, batch, steps_n: int, warmup: int = 5):
  """(state, metrics, seconds per step) of `steps_n` jitted steps on one batch, after `warmup`
  untimed ones (compilation and the first dispatches)."""
  import jax
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(state)
  t = time.time()
  for _ in range(steps_n):
    state, m = step(state, batch)
  jax.block_until_ready(state)
  return state, m, (time.time() - t) / steps_n
