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
            trials=None, storage=None, overrides=()) -> dict[str, Any]:
  """Everything checked before a trial starts; returns the plan also written to sweep.json."""
  from jaxclf.config import load_config
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
          "sweep": sweep, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
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
  tmp = f"{path}.{os.getpid()}.tmp"  # workers of one Indexed Job may all write it at once
  with open(tmp, "w") as f:
    json.dump(plan, f, indent=2, default=list)
  os.replace(tmp, path)
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
                      sweep["pruner"], spaces.METRICS[sweep["metric"]])


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
  fail_stale_trials(study, workdir)
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
  Ctrl-C stops the workers, whose running trials are marked interrupted: rerun with --resume."""
  from jaxclf.sweeps.study import fail_stale_trials, resume_interrupted
  from jaxclf.sweeps.summary import write_summary
  plan = load_plan(workdir)
  study = open_study(plan, workdir)
  fail_stale_trials(study, workdir)
  again = resume_interrupted(study)
  if again:
    print(f"[sweep] resuming interrupted trial(s) {again} from their checkpoints", flush=True)
  interrupted = False
  if parallel <= 1:
    try:
      run_worker(workdir)
    except KeyboardInterrupt:
      interrupted = True
  else:
    procs = [_spawn(workdir, cores, i) for i, cores in enumerate(core_shares(parallel))]
    print(f"[sweep] {parallel} workers (logs: {workdir}/worker_*.log)", flush=True)
    try:
      for p in procs:
        p.wait()
    except KeyboardInterrupt:
      interrupted = True
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGINT)
      for p in procs:
        p.wait()
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGINT, 130)]
    if bad and not interrupted:
      log.warning("worker(s) %s exited abnormally; see %s/worker_N.log. Their trials are "
                  "retried by the next `jaxclf sweep --resume %s`", bad, workdir, workdir)
  summary = write_summary(open_study(plan, workdir), plan, workdir)
  if interrupted:
    print(f"[sweep] interrupted: `jaxclf sweep --resume {workdir}` continues it", flush=True)
    raise KeyboardInterrupt
  return summary
