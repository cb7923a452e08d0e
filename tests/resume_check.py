"""The kill -9 resume contract, shared by every test that checks it (plain training, the slow
augmentation and architecture variants, weight averaging, a full disk): run a command to the end;
run it again in another workdir and kill -9 it as soon as its first checkpoint is committed;
rerun the same command there; both runs must end with the same final step, metrics, calibration
and history. The caller compares the weights (what "bit-identical" covers differs per test)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def untimed(history: list[dict]) -> list[dict]:
  return [{k: v for k, v in h.items() if k != "wall_time"} for h in history]


def kill_after_first_checkpoint(cmd: Sequence[str], workdir: str, env: dict,
                                wait_s: float = 600) -> int:
  """Starts `cmd`, kills it with SIGKILL once `workdir`'s first checkpoint is committed; returns
  that checkpoint's step. `wait_s` bounds the wait for the checkpoint, not a timing claim."""
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  latest = os.path.join(workdir, "checkpoints", "latest")
  deadline = time.monotonic() + wait_s
  killed_after = None
  while time.monotonic() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
    if steps:
      proc.send_signal(signal.SIGKILL)
      killed_after = max(steps)
      break
    time.sleep(0.01)
  proc.wait()
  assert killed_after is not None, "the run finished (or stalled) before it could be killed"
  assert proc.returncode == -signal.SIGKILL
  assert json.load(open(os.path.join(workdir, "run.json")))["status"] == "running"
  return killed_after


def assert_kill9_resume_is_exact(tmp_path, make_cmd: Callable[[str], list[str]],
                                 final_step: int) -> tuple[str, str, dict, dict]:
  """Reference run, killed run, rerun; checks the run records agree. -> (ref_dir, cut_dir,
  ref run.json, cut run.json) for the caller's own checks (weights, recorded options)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  subprocess.run(make_cmd(ref_dir), check=True, env=env, cwd=ROOT, capture_output=True)
  kill_after_first_checkpoint(make_cmd(cut_dir), cut_dir, env)
  subprocess.run(make_cmd(cut_dir), check=True, env=env, cwd=ROOT, capture_output=True)
  ref = json.load(open(os.path.join(ref_dir, "run.json")))
  cut = json.load(open(os.path.join(cut_dir, "run.json")))
  assert cut["status"] == "completed" and cut["resumed_from_step"] is not None
  assert 0 < cut["resumed_from_step"] < cut["final_step"] == ref["final_step"] == final_step
  assert cut["metrics"] == ref["metrics"]
  assert cut.get("calibration") == ref.get("calibration")
  assert untimed(cut["history"]) == untimed(ref["history"])
  return ref_dir, cut_dir, ref, cut
