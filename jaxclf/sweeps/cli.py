"""`jaxclf sweep`: start, resume or join an Optuna sweep defined by a config's get_sweep(name).

  jaxclf sweep --config configs/cnn.py --sweep random --workdir sweeps/s1 --parallel 2
  jaxclf sweep --config configs/cnn.py --sweep tpe --workdir sweeps/s2 --pruner asha \\
      [--storage postgresql://...]          (default: the journal file sweeps/s2/study.journal)
  jaxclf sweep --resume sweeps/s2           (skips finished trials, resumes unfinished ones)
  jaxclf sweep --config ... --worker        (one worker on a shared study: run it on each machine)
"""
from __future__ import annotations

import sys

from jaxclf.sweeps.space import PRUNERS, SAMPLERS


def _run(a) -> int:
  from jaxclf.sweeps import runner
  from jaxclf.sweeps.summary import format_summary
  workdir = a.resume or a.workdir
  if not a.resume:
    if not (a.config and a.sweep and a.workdir):
      print("jaxclf sweep: give --config, --sweep and --workdir (or --resume DIR)", file=sys.stderr)
      return 2
    runner.prepare(a.config, a.sweep, a.workdir, sampler=a.sampler, pruner=a.pruner,
                   trials=a.trials, storage=a.storage, overrides=a.set)
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
  s.add_argument("--parallel", type=int, default=1, help="trial processes on this machine")
  s.add_argument("--worker", action="store_true", help="run one worker here and exit")
  s.add_argument("--threads", type=int, help=__import__("argparse").SUPPRESS)
  s.add_argument("--worker-index", type=int, help="this worker's number (seeds its sampler; "
                 "default: $JOB_COMPLETION_INDEX or 0)")
  s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every trial")
  s.set_defaults(func=_run)
