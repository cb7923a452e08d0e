"""run_sweep: check the sweep, open (or resume) the study, run N worker processes on it, summarize.

  <workdir>/sweep.json          what was asked (config, sweep, sampler, pruner, storage, budget)
  <workdir>/study.journal       the Optuna study (unless --storage names an RDB)
  <workdir>/trials/trial_NNNN/  one ordinary run per trial (run.json, checkpoints, tb/)
  <workdir>/summary.json|.md    the trials table, the best trial by val, its reproduce command

Workers are Optuna's distributed pattern: every worker runs study.optimize on the same study
until the budget is used. `--parallel N` starts N of them here and gives each a share of the CPU
cores (affinity, so XLA's and oneDNN's thread pools size themselves to it, and Grain's read
threads); `--worker` runs one in this process (the Kubernetes Indexed Job does that on each pod).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from jaxclf.sweeps import space as spaces

log = logging.getLogger("jaxclf.sweep")


def prepare(config_spec: str, sweep_name: str, workdir: str, *, sampler=None, pruner=None,
            trials=None, storage=None, overrides=(), grace_s=None) -> dict[str, Any]:
  """Everything checked before a trial starts; returns the plan also written to sweep.json."""
  from jaxclf.config import load_config
  from jaxclf.sweeps.study import GRACE_S
  _refuse_a_password_in(storage)
  base = load_config(config_spec, list(overrides))
  sweep = spaces.load_sweep(config_spec, sweep_name)
  if sampler:
    sweep["sampler"] = sampler
  if pruner:
    sweep["pruner"] = pruner
  if trials:
    sweep["trials"] = int(trials)
  where = f"{config_spec.partition(':')[0]}:get_sweep({sweep_name!r})"
  sweep = spaces.normalize(sweep, where)  # again, with the command-line choices
  spaces.check_against_config(sweep, base, where)
  plan = {"config": config_spec, "sweep_name": sweep_name, "overrides": list(overrides),
          "storage": storage or None, "study_name": f"{os.path.basename(os.path.abspath(workdir))}",
          "sweep": sweep, "grace_s": float(grace_s or GRACE_S),
          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "sweep.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if (old["config"], old["sweep_name"], old["sweep"]) != (config_spec, sweep_name,
                                                           json.loads(json.dumps(sweep))):
      raise spaces.SpaceError(f"{workdir} already holds a different sweep "
                              f"({old['config']} {old['sweep_name']}); use another --workdir or "
                              f"`jaxclf sweep --resume {workdir}`")
    plan["created"] = old.get("created", plan["created"])
  _write_plan(plan, workdir)
  return plan


def _refuse_a_password_in(storage: str | None) -> None:
  """sweep.json keeps the storage URL on the sweep's shared volume, readable by every worker and
  whoever lists the runs: a password has no place there. libpq's own variables (PGPASSWORD, or a
  ~/.pgpass file) give it to psycopg without the URL."""
  from urllib.parse import urlsplit
  if storage and "://" in storage and urlsplit(storage).password:
    shown = storage.replace(f":{urlsplit(storage).password}@", ":***@")
    raise spaces.SpaceError(f"--storage {shown}: the URL holds a password, which sweep.json would "
                            "keep on the shared workdir; drop it from the URL and give it as "
                            "PGPASSWORD (or in ~/.pgpass), which psycopg reads")


def _write_plan(plan: dict[str, Any], workdir: str) -> None:
  path = os.path.join(workdir, "sweep.json")
  tmp = f"{path}.{os.getpid()}.tmp"  # workers of one Indexed Job may all write it at once
  with open(tmp, "w") as f:
    json.dump(plan, f, indent=2, default=list)
  os.replace(tmp, path)


# What `--resume DIR` does with the options that shaped the sweep: the study's storage, its
# sampler and pruner, and the trials' config are fixed when it starts (a different one would be
# another sweep); the budget may grow or shrink.
FIXED_ON_RESUME = {"sampler": ("sweep", "sampler"), "pruner": ("sweep", "pruner"),
                   "storage": ("storage",), "set": ("overrides",)}


def resume_plan(workdir: str, *, trials=None, **fixed) -> dict[str, Any]:
  """The plan of the sweep in `workdir`, with a new trial budget if given. An option of
  FIXED_ON_RESUME that differs from the recorded one is refused, naming the option."""
  plan = load_plan(workdir)
  for option, value in fixed.items():
    if value in (None, [], ()):
      continue
    recorded = plan
    for key in FIXED_ON_RESUME[option]:
      recorded = recorded.get(key) if isinstance(recorded, dict) else None
    if (list(value) if option == "set" else value) != recorded:
      shown = "the journal file" if option == "storage" and not recorded else repr(recorded)
      raise spaces.SpaceError(f"--{option} {value!r} with --resume: {workdir} is a sweep with "
                              f"{option} {shown}, which a resume cannot change; start a new "
                              f"--workdir for another {option}")
  if trials is not None:
    if int(trials) < 1:
      raise spaces.SpaceError(f"--trials {trials}: must be >= 1")
    plan["sweep"]["trials"] = int(trials)
    _write_plan(plan, workdir)
  return plan


def load_plan(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no sweep here to resume (start one with --config/--sweep)")
  with open(path) as f:
    return json.load(f)


def open_study(plan: dict[str, Any], workdir: str, worker_index: int = 0):
  """The shared study. Each worker's sampler gets seed + worker_index: workers with one seed
  would draw the same parameters."""
  from jaxclf.sweeps.study import create_study
  sweep = {**plan["sweep"], "seed": int(plan["sweep"]["seed"]) + int(worker_index)}
  return create_study(workdir, sweep, plan["study_name"], plan["storage"], sweep["sampler"],
                      sweep["pruner"], spaces.METRICS[sweep["metric"]], grace_s(plan))


def grace_s(plan: dict[str, Any]) -> float:
  from jaxclf.sweeps.study import GRACE_S
  return float(plan.get("grace_s") or GRACE_S)


def run_worker(workdir: str, threads: int | None = None, index: int | None = None) -> None:
  """One worker: optimize the shared study until the budget is used (or the grid is done).
  `index`: this worker's number (a Kubernetes Indexed Job sets JOB_COMPLETION_INDEX)."""
  from jaxclf.config import load_config
  from jaxclf.sweeps.objective import Objective
  from jaxclf.sweeps.study import StopAtBudget, budget_used, fail_stale_trials
  plan = load_plan(workdir)
  if index is None:
    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
  study = open_study(plan, workdir, index)
  fail_stale_trials(study, workdir, grace_s(plan))
  n = int(plan["sweep"]["trials"])
  if budget_used(study) >= n and not _waiting(study):
    return
  thread_overrides = {"data.read_threads": threads} if threads else None
  objective = Objective(load_config(plan["config"], plan["overrides"]), plan["sweep"], workdir,
                        plan["sweep_name"], thread_overrides)
  # catch=(Exception,): a crashed or NaN trial is FAIL with its reason; the sweep goes on.
  study.optimize(objective, catch=(Exception,), callbacks=[StopAtBudget(n)],
                 gc_after_trial=True)


def _waiting(study) -> bool:
  from optuna.trial import TrialState
  return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def core_shares(parallel: int) -> list[list[int]]:
  """Disjoint CPU core sets, one per worker (workers beyond the core count share round-robin)."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
      list(range(os.cpu_count() or 1))
  if parallel >= len(cores):
    return [[cores[i % len(cores)]] for i in range(parallel)]
  per = len(cores) // parallel
  return [cores[i * per:(i + 1) * per] for i in range(parallel)]


def _spawn(workdir: str, cores: list[int], index: int) -> subprocess.Popen:
  env = dict(os.environ)
  k = str(len(cores))
  env.update(OMP_NUM_THREADS=k, OPENBLAS_NUM_THREADS=k, MKL_NUM_THREADS=k)
  cmd = [sys.executable, "-m", "jaxclf.cli", "sweep", "--resume", workdir, "--worker",
         "--threads", k, "--worker-index", str(index)]
  pre = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None
  log_path = os.path.join(workdir, f"worker_{index}.log")
  with open(log_path, "ab") as out:
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pre)


def run_sweep(workdir: str, parallel: int = 1) -> dict[str, Any]:
  """Runs (or resumes) the sweep planned in <workdir>/sweep.json; returns the summary.
  Ctrl-C stops the workers, whose running trials are marked interrupted: rerun with --resume.
  Trials left RUNNING by a dead worker (here or on another machine) are waited for until their
  heartbeat is older than the grace period, then run again from their checkpoints."""
  from jaxclf.sweeps.study import fail_stale_trials, resume_interrupted
  from jaxclf.sweeps.summary import write_summary
  plan = load_plan(workdir)
  study = open_study(plan, workdir)
  fail_stale_trials(study, workdir, grace_s(plan))
  again = resume_interrupted(study)
  if again:
    print(f"[sweep] resuming interrupted trial(s) {again} from their checkpoints", flush=True)
  interrupted = False
  try:
    while True:
      _run_workers(workdir, parallel)
      if not _retry_dead_workers_trials(study, workdir, plan):
        break
  except KeyboardInterrupt:
    interrupted = True
  summary = write_summary(open_study(plan, workdir), plan, workdir)
  if interrupted:
    print(f"[sweep] interrupted: `jaxclf sweep --resume {workdir}` continues it", flush=True)
    raise KeyboardInterrupt
  return summary


def _retry_dead_workers_trials(study, workdir: str, plan: dict[str, Any]) -> bool:
  """After this machine's workers are done: True when trials of dead workers were re-queued
  (run the workers again), False when every trial has ended."""
  from jaxclf.sweeps.study import wait_for_running
  shown = []

  def waiting(numbers):
    if numbers != shown:
      shown[:] = numbers
      print(f"[sweep] trial(s) {numbers} still RUNNING elsewhere: waiting for them to finish, or "
            f"for their heartbeat to be {grace_s(plan):.0f}s old", flush=True)
  stale = wait_for_running(study, workdir, grace_s(plan), on_wait=waiting)
  if stale:
    print(f"[sweep] trial(s) {stale} lost their worker: running them again from their "
          "checkpoints", flush=True)
  return bool(stale) or _waiting(study)


def _run_workers(workdir: str, parallel: int) -> None:
  if parallel <= 1:
    run_worker(workdir)
    return
  procs = [_spawn(workdir, cores, i) for i, cores in enumerate(core_shares(parallel))]
  print(f"[sweep] {parallel} workers (logs: {workdir}/worker_*.log)", flush=True)
  try:
    for p in procs:
      p.wait()
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGINT)
    for p in procs:
      p.wait()
    raise
  bad = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGINT, 130)]
  if bad:
    log.warning("worker(s) %s exited abnormally; see %s/worker_N.log. Their trials run "
                "again once their heartbeat is older than the grace period", bad, workdir)
