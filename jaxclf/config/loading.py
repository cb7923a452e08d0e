"""Load a run config: a Python file (`get_config(arg)`) or YAML, then overrides, then validation.

Order of precedence (later wins):
  1. the config file: `configs/cnn.py`, `configs/resnet.py:model=resnet34,epochs=30`, or `configs/cnn.yaml`
     (YAML holds only the keys that differ from jaxclf.config.defaults, like a .py file would);
  2. environment variables `JAXCLF_<SECTION>__<KEY>=value` (double underscore = one level down;
     e.g. JAXCLF_TRAIN__BATCH_SIZE=256, JAXCLF_OPTIMIZER__LEARNING_RATE=0.05, JAXCLF_SEED=3);
  3. command-line overrides `--config.train.batch_size=256` (or `--set train.batch_size=256`).
Values are parsed as YAML scalars/lists (`0.05`, `true`, `[32, 64]`) and must match the type of
the key they replace; `python -m jaxclf.main` hands over the values that ml_collections'
config_flags parsed already, as (key, value) pairs, through the same set_dotted. Validation (jaxclf.config.validate) runs before any compute.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterable, Mapping

import ml_collections
import yaml

from jaxclf.config.defaults import default_config
from jaxclf.config.validate import ConfigError, check_known_key, coerce, validate

ENV_PREFIX = "JAXCLF_"


def config_module(path: str):
  """The Python config file at `path` as a module (config files are loaded by path, not from a
  package, so one config reuses another's recipe functions through this)."""
  spec = importlib.util.spec_from_file_location(f"_jaxclf_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_py(path: str, arg: str | None) -> ml_collections.ConfigDict:
  module = config_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: a config file must define get_config(arg=None)")
  try:  # config files parse `arg` with jaxclf.config.args.parse_arg
    return module.get_config(arg)
  except ConfigError as e:
    raise ConfigError(f"{path}:{arg or ''}: {e}") from None


def _merge(base: ml_collections.ConfigDict, update: Mapping[str, Any], prefix: str = "") -> None:
  for key, value in update.items():
    dotted = f"{prefix}{key}"
    if prefix == "evals." and key not in base:  # a new evaluator entry (validate checks it)
      base[key] = ml_collections.ConfigDict()
      for k, v in dict(value or {}).items():
        base[key][k] = _tuples(v)
      continue
    check_known_key(base, key, dotted)
    if isinstance(base[key], ml_collections.ConfigDict) and key != "kwargs":
      if not isinstance(value, Mapping):
        raise ConfigError(f"{dotted}: expected a section (mapping), got {value!r}")
      _merge(base[key], value, dotted + ".")
    elif key == "kwargs":
      base[key] = ml_collections.ConfigDict({k: _tuples(v) for k, v in dict(value or {}).items()})
    else:
      base[key] = coerce(base[key], value, dotted)


def _tuples(value):
  """YAML lists -> tuples, so a YAML config equals its Python twin (and stays hashable)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _load_yaml(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    try:
      data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(data, Mapping):
    raise ConfigError(f"{path}: the top level must be a mapping of sections")
  config = default_config()
  _merge(config, data)
  return config


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` -> ConfigDict (unvalidated)."""
  path, arg = spec, None
  if ":" in spec and not os.path.exists(spec):
    path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  if path.endswith((".yaml", ".yml")):
    if arg:
      raise ConfigError(f"{path}: YAML configs take no ':arg'")
    return _load_yaml(path)
  if path.endswith(".py"):
    return _load_py(path, arg)
  raise ConfigError(f"config file {path!r}: expected a .py or .yaml file")


def set_dotted(config: ml_collections.ConfigDict, dotted: str, raw: Any,
               parsed: bool = False) -> None:
  """config[dotted] = raw (a YAML scalar/list string, or a typed value when `parsed`), checked
  against the key's type with a did-you-mean for unknown keys."""
  node = config
  parts = dotted.split(".")
  for i, part in enumerate(parts[:-1]):
    check_known_key(node, part, ".".join(parts[:i + 1]))
    node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section")
  key = parts[-1]
  value = yaml.safe_load(raw) if isinstance(raw, str) and not parsed else raw
  if parts[-2:-1] == ["kwargs"]:
    node[key] = _tuples(value)  # model kwargs are free-form: the model constructor checks them
    return
  check_known_key(node, key, dotted)
  node[key] = coerce(node[key], value, dotted)


def env_overrides(environ: Mapping[str, str], top_level: Iterable[str] = ()
                  ) -> list[tuple[str, str]]:
  """(dotted key, value) for each JAXCLF_* variable that addresses the config: a `SECTION__KEY`
  name (a misspelt one too, so that it fails with a did-you-mean), or a top-level key such as
  JAXCLF_SEED. Other JAXCLF_* names belong to other components (JAXCLF_REGISTRY, JAXCLF_SERVE_*,
  JAXCLF_ONEDNN*, JAXCLF_LOGLEVEL, ...) and are not config overrides."""
  top = {k.lower() for k in top_level}
  out = []
  for name, value in sorted(environ.items()):
    if not name.startswith(ENV_PREFIX) or name == "JAXCLF_CACHE":
      continue
    dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
    if "." in dotted or dotted in top:
      out.append((dotted, value))
  return out


def load_config(spec: str, overrides: Iterable[str] = (), environ: Mapping[str, str] | None = None,
                ) -> ml_collections.ConfigDict:
  """The one entry point used by `python -m jaxclf.main`, `jaxclf train` and the sweep runner."""
  config = load_file(spec)
  environ = os.environ if environ is None else environ
  top_level = [k for k, v in config.items() if not isinstance(v, ml_collections.ConfigDict)]
  for dotted, value in env_overrides(environ, top_level):
    try:
      set_dotted(config, dotted, value)
    except ConfigError as e:
      raise ConfigError(f"environment variable {ENV_PREFIX}{dotted.upper().replace('.', '__')}: {e}") from None
  for item in overrides:
    if isinstance(item, tuple):  # (dotted, value already typed): ml_collections config_flags
      set_dotted(config, item[0], item[1], parsed=True)
      continue
    item = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected key=value, e.g. train.batch_size=256")
    dotted, _, value = item.partition("=")
    set_dotted(config, dotted.strip(), value)
  validate(config)
  return config
