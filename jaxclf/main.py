"""Thin entry point, as in flax examples/imagenet:

  python -m jaxclf.main --config=configs/cnn.py --workdir=runs/cnn [--config.train.batch_size=128]

Flags are parsed, the config is loaded (file -> JAXCLF_* env -> --config.* overrides) and
validated, then train_and_evaluate(config, workdir) runs. Rerunning the same command resumes.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("config", "configs/cnn.py", "Config file: path.py[:arg] or path.yaml.")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, run.json).")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def _parse(argv):
  # `--config.a.b=v` are config overrides, not absl flags: take them out before absl parses.
  rest = []
  for a in argv:
    (_OVERRIDES if a.startswith("--config.") else rest).append(a)
  return FLAGS(rest)


def main(argv):
  del argv
  # One code path for `python -m jaxclf.main` and `jaxclf train`; run_training sets up host memory
  # (jaxclf/ops/host_memory.py) before anything starts the JAX backend.
  from jaxclf.cli import run_training
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  import logging as pylogging
  pylogging.basicConfig(level=pylogging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO through absl
  sys.exit(run_training(FLAGS.config, FLAGS.workdir, _OVERRIDES))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
