"""`jaxclf sweep`: start, resume or join an Optuna sweep defined by a config's get_sweep(name).

  jaxclf sweep --config configs/cnn.py --sweep random --workdir sweeps/s1 --parallel 2
  jaxclf sweep --config configs/cnn.py --sweep tpe --workdir sweeps/s2 --pruner asha \\
      [--storage postgresql://...]          (default: the journal file sweeps/s2/study.journal)
  jaxclf sweep --resume sweeps/s2 [--trials 32]   (skips finished trials, resumes unfinished
                                            ones; --trials changes the budget. The storage,
                                            sampler, pruner and --set are the sweep's own: a
                                            different one on --resume is an error)
  jaxclf sweep --config ... --worker        (one worker on a shared study: run it on each machine)
"""
from __future__ import annotations

import sys

from jaxclf.sweeps.space import PRUNERS, SAMPLERS


def _run(a) -> int:
  from jaxclf.sweeps import runner
  from jaxclf.sweeps.summary import format_summary
  workdir = a.resume or a.workdir
  if a.resume:
    for option in ("config", "sweep", "workdir", "grace"):
      if getattr(a, option) is not None:
        print(f"jaxclf sweep: error: --{option} with --resume: the sweep in {a.resume} keeps "
              f"its own (sweep.json)", file=sys.stderr)
        return 2
    runner.resume_plan(a.resume, trials=a.trials, sampler=a.sampler, pruner=a.pruner,
                       storage=a.storage, set=a.set)
  else:
    if not (a.config and a.sweep and a.workdir):
      print("jaxclf sweep: give --config, --sweep and --workdir (or --resume DIR)", file=sys.stderr)
      return 2
    runner.prepare(a.config, a.sweep, a.workdir, sampler=a.sampler, pruner=a.pruner,
                   trials=a.trials, storage=a.storage, overrides=a.set, grace_s=a.grace)
  if a.worker:
    runner.run_worker(workdir, threads=a.threads, index=a.worker_index)
    from jaxclf.sweeps.summary import write_summary  # each worker (pod) leaves a current summary
    plan = runner.load_plan(workdir)
    write_summary(runner.open_study(plan, workdir), plan, workdir)
    return 0
  try:
    summary = runner.run_sweep(workdir, parallel=a.parallel)
  except KeyboardInterrupt:
    return 130
  print(format_summary(summary))
  return 0


def _grace(text: str) -> float:
  import argparse
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if value < 15:  # the journal heartbeat beats every 10 s: less would kill live workers
    raise argparse.ArgumentTypeError(f"{text!r}: give seconds, at least 15")
  return value


def add_sweep_commands(sub) -> None:
  s = sub.add_parser("sweep", help="hyperparameter search (Optuna) over a config's get_sweep()",
                     description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
  s.add_argument("--config", help="config file path.py[:arg] defining get_sweep(name)")
  s.add_argument("--sweep", help="name passed to the config's get_sweep()")
  s.add_argument("--workdir")
  s.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR")
  s.add_argument("--sampler", choices=SAMPLERS, help="override the sweep's sampler")
  s.add_argument("--pruner", choices=PRUNERS, help="override the sweep's pruner")
  s.add_argument("--trials", type=int, help="override the sweep's trial budget")
  s.add_argument("--storage", help="RDB URL shared by many machines (default: journal file)")
  s.add_argument("--grace", type=_grace, metavar="SECONDS", help="a worker whose heartbeat is "
                 "this old is dead; its trial runs again from its checkpoint (default 60, min 15)")
  s.add_argument("--parallel", type=int, default=1, help="trial processes on this machine")
  s.add_argument("--worker", action="store_true", help="run one worker here and exit")
  s.add_argument("--threads", type=int, help=__import__("argparse").SUPPRESS)
  s.add_argument("--worker-index", type=int, help="this worker's number (seeds its sampler; "
                 "default: $JOB_COMPLETION_INDEX or 0)")
  s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every trial")
  s.set_defaults(func=_run)
