"""Shared by the benches: print a result as JSON and optionally save it."""
import json
import os
import time


def emit(result: dict, out: str | None) -> None:
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
