"""`jaxclf` command line: data | train | sweep | runs | evaluate | export | registry | serve | predict.

Each command group lives beside the code it drives and registers itself here; user errors
(config, data, missing files) print one line naming the field or file and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

# (module, function) pairs that add subcommands; a group whose module is absent is skipped.
COMMAND_GROUPS = [
    ("jaxclf.data.data_cli", "add_data_commands"),
    ("jaxclf.evaluate.evaluate", "add_evaluate_command"),
    ("jaxclf.deploy.cli", "add_export_and_registry_commands"),
    ("serving.predict_cli", "add_serve_commands"),
    ("jaxclf.sweeps.cli", "add_sweep_commands"),
    ("jaxclf.tracking.compare", "add_runs_commands"),
    ("jaxclf.models.weights_cli", "add_weights_commands"),
]


class UserError(Exception):
  """Raised for problems the user can fix; printed as one line."""


def _user_error_types():
  from jaxclf.config import ConfigError
  from jaxclf.data.types import DataError
  from jaxclf.diskspace import DiskFullError
  return (ConfigError, DataError, UserError, FileNotFoundError, DiskFullError)


def run_training(config_spec: str, workdir: str, overrides=()) -> int:
  from jaxclf.ops.compile_cache import enable_compilation_cache
  from jaxclf.ops.host_memory import reuse_freed_memory
  reuse_freed_memory()  # before the JAX backend starts its threads; a no-op the second time
  enable_compilation_cache()
  from jaxclf.config import load_config
  from jaxclf.tracking.tracked_run import train_with_tracking
  try:
    config = load_config(config_spec, overrides)
    record = train_with_tracking(config, workdir)
  except _user_error_types() as e:
    print(f"jaxclf: error: {e}", file=sys.stderr)
    return 2
  test = (record.get("metrics") or {}).get("test") or {}
  val = (record.get("metrics") or {}).get("val") or {}
  print(json.dumps({"workdir": workdir, "status": record.get("status"),
                    "val_accuracy": val.get("accuracy"), "test_accuracy": test.get("accuracy"),
                    "duration_s": record.get("duration_s")}))
  return 0


# Set in the trainer process that `jaxclf train` supervises (see _train).
SUPERVISED_ENV = "JAXCLF_SUPERVISED_CHILD"


def _train(args) -> int:
  overrides = list(args.set or []) + list(args.config_overrides or [])
  settings = None if os.environ.get(SUPERVISED_ENV) else _distributed_settings(args.config,
                                                                               overrides)
  if settings is None or not settings.enabled:
    return run_training(args.config, args.workdir, overrides)
  # A multi-process run trains in a child process: when a peer dies, JAX ends the survivors with
  # a C++ abort and a long log; the supervisor turns that into one last line naming the process.
  sets = [x for o in overrides for x in ("--set", o.removeprefix("--config."))]
  cmd = [sys.executable, "-m", "jaxclf.cli", "train", "--config", args.config,
         "--workdir", args.workdir, *sets]
  from jaxclf.train.distributed import run_supervised
  return run_supervised(cmd, settings, env={**os.environ, SUPERVISED_ENV: "1"})


def _distributed_settings(config_spec: str, overrides):
  """config.distributed as Settings (a config error: None, the trainer itself reports it)."""
  from jaxclf.config import ConfigError, load_config
  from jaxclf.train.distributed import Settings
  try:
    return Settings.from_config(load_config(config_spec, overrides).distributed.to_dict())
  except ConfigError:
    return None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxclf", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a model from a config (reruns resume)")
  t.add_argument("--config", default="configs/cnn.py", help="path.py[:arg] or path.yaml")
  t.add_argument("--workdir", required=True)
  t.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="config override, e.g. --set train.batch_size=128 (repeatable)")
  t.set_defaults(func=_train)
  for module_name, fn in COMMAND_GROUPS:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name and module_name.startswith(e.name):
        continue  # that group is not installed in this environment
      raise
    getattr(module, fn)(sub)
  return p


# Commands whose time goes into XLA CPU executions (large per-call scratch): they keep freed host
# memory mapped (jaxclf/ops/host_memory.py). The servers are left on glibc's defaults: their many
# request threads would all share one arena.
# (`train` sets it up in run_training, the path `python -m jaxclf.main` shares.)
_JAX_COMPUTE_COMMANDS = ("sweep", "evaluate", "export")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Quiet(logging.Filter):
  """Drops a library's records whose message starts with one of `prefixes`."""

  def __init__(self, *prefixes: str):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


# Library warnings that are not the user's to act on, by logger. onnx_ir notes intermediate
# values it leaves untyped in the file; every export is parity-checked against JAX, so a wrong
# graph fails there, with its numbers.
_QUIET = {"onnx_ir.serde": _Quiet("The value type for shape")}


def configure_logging() -> None:
  """The console a user reads: jaxclf's own lines at $JAXCLF_LOGLEVEL (INFO by default) and
  every library's warnings and errors. Libraries' INFO lines stay out: JAX's probe for a TPU
  ("Unable to initialize backend 'tpu': ... libtpu.so", on every machine without one; a GPU is
  still found and used), jax2onnx's notes on optional plugins (MaxText, MaxDiffusion) and its
  conversion parameters, orbax's line per checkpoint save."""
  from absl import logging as absl_logging
  root = logging.getLogger()
  # absl's app.run (`python -m jaxclf.main`) puts its handler on the root logger first, which
  # would make basicConfig a no-op and, with set_verbosity, drop jaxclf's INFO lines.
  if absl_logging.get_absl_handler() in root.handlers:
    root.removeHandler(absl_logging.get_absl_handler())
  logging.basicConfig(format=LOG_FORMAT)
  name = os.environ.get("JAXCLF_LOGLEVEL", "INFO").strip().upper()
  level = logging.getLevelNamesMapping().get(name, logging.INFO)
  root.setLevel(max(level, logging.WARNING))
  logging.getLogger("jaxclf").setLevel(level)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs through absl's logger
  for logger, quiet in _QUIET.items():
    logging.getLogger(logger).addFilter(quiet)  # once: the same filter is not added twice


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # `--config.a.b=v` works for `jaxclf train` as it does for `python -m jaxclf.main`.
  config_overrides = [a for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  configure_logging()
  from jaxclf.data.data_cli import parse  # `data ingest --runner=...` passes Beam's options on
  args = parse(build_parser(), argv)
  args.config_overrides = config_overrides
  if args.command in _JAX_COMPUTE_COMMANDS:  # before the JAX backend starts its threads
    from jaxclf.ops.compile_cache import enable_compilation_cache
    from jaxclf.ops.host_memory import reuse_freed_memory
    reuse_freed_memory()
    enable_compilation_cache()
  try:
    return int(args.func(args) or 0)
  except _user_error_types() as e:
    print(f"jaxclf: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
