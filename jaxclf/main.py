"""Thin entry point, as in flax examples/imagenet:

  python -m jaxclf.main --config=configs/cnn.py --workdir=runs/cnn [--config.train.batch_size=128]
  python -m jaxclf.main --config=configs/resnet.py:model=resnet18 --workdir=runs/r18 \\
      --config.optimizer.learning_rate=0.05

`--config` is ml_collections' `config_flags.DEFINE_config_file` (a .py file's `get_config(arg)`;
a .yaml file goes through jaxclf/config/yaml_file.py), which parses the `--config.*` values.
The config is then layered by jaxclf.config.load_config, the one mechanism `jaxclf train --set`
also uses: file -> JAXCLF_* environment -> command line, each key checked with a did-you-mean,
then validated before any compute. Rerunning the same command resumes.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_YAML_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "yaml_file.py")
# accept_new_attributes: config_flags lets unknown keys through, so that load_config names them
# with its did-you-mean (and model.kwargs stays free-form).
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: path.py[:arg] or path.yaml (default configs/cnn.py); "
    "--config.a.b=value overrides one key.", lock_config=False, accept_new_attributes=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, run.json).")
flags.DEFINE_bool("print_config", False, "Print the resolved, validated config as JSON and exit "
                  "(nothing is trained).")
FLAGS = flags.FLAGS


def _config_spec_and_overrides() -> tuple[str, list[tuple[str, object]]]:
  if FLAGS["config"].value is None:
    return "configs/cnn.py", []
  spec = config_flags.get_config_filename(FLAGS["config"])
  if spec.startswith(_YAML_SHIM + ":"):
    spec = spec[len(_YAML_SHIM) + 1:]
  return spec, list(config_flags.get_override_values(FLAGS["config"]).items())


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with YAML configs routed through the shim, and a flag or config-file error
  printed as one line (exit 2), as `jaxclf train` does."""
  argv = [f"--config={_YAML_SHIM}:{a.split('=', 1)[1]}"
          if a.startswith("--config=") and a.endswith((".yaml", ".yml")) else a for a in argv]
  try:
    return FLAGS(argv)
  except (flags.Error, ValueError) as e:
    from jaxclf.config.loading import ConfigError, load_file
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    message = str(e).strip().splitlines()[-1]
    if spec:
      try:
        load_file(spec)  # names the file and the bad arg, where config_flags dumps a traceback
      except ConfigError as ce:
        message = str(ce)
    print(f"jaxclf: error: {message}", file=sys.stderr)
    sys.exit(2)


def _print_config(spec: str, overrides) -> int:
  import json

  from jaxclf.config import ConfigError, load_config
  try:
    config = load_config(spec, overrides)
  except ConfigError as e:
    print(f"jaxclf: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(config.to_dict(), indent=2, default=list))
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.print_config:
    sys.exit(_print_config(*_config_spec_and_overrides()))
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  # One code path for `python -m jaxclf.main` and `jaxclf train`: the same console (jaxclf's
  # lines, libraries' warnings) and run_training, which sets up host memory
  # (jaxclf/ops/host_memory.py) before anything starts the JAX backend.
  from jaxclf.cli import configure_logging, run_training
  configure_logging()
  spec, overrides = _config_spec_and_overrides()
  sys.exit(run_training(spec, FLAGS.workdir, overrides))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
