"""`get_config(arg)`'s one argument parser, shared by every config file (big_vision's
`parse_arg`, big_vision/configs/common.py):

  def get_config(arg=None):
    arg = parse_arg(arg, model="resnet18", width=64, epochs=30)
    ...

  --config=configs/resnet.py:model=resnet34,width=32   key=value pairs, comma-separated
  --config=configs/resnet.py:resnet34                   one bare value: the first key's
  --config=configs/cnn.py:tiny                          (`variant=tiny` in configs/cnn.py)
  --config=configs/x.py:flag                            a bare name of a boolean key: true

Types come from the defaults (a bool takes true/false). Unknown keys, bad values and values
outside `choices` raise ConfigError with a did-you-mean; the loader adds the file's name.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections

from jaxclf.config.validate import ConfigError, did_you_mean


def _convert(name: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    if raw.lower() not in ("true", "false", ""):
      raise ConfigError(f"arg {name}={raw!r}: expected true or false")
    return raw.lower() == "true"
  try:
    return type(default)(raw)
  except ValueError:
    raise ConfigError(f"arg {name}={raw!r}: expected {type(default).__name__}") from None


def parse_arg(arg: str | None, *, choices: Mapping[str, Sequence[Any]] | None = None,
              **spec: Any) -> ml_collections.ConfigDict:
  """`arg` ('k=v,k2=v2', a bare value, or None) -> ConfigDict of every key in `spec`, typed as
  its default, which it keeps when `arg` does not set it."""
  arg = (arg or "").strip()
  if arg and "," not in arg and "=" not in arg:
    first = next(iter(spec), None)
    if first is None:
      raise ConfigError(f"arg {arg!r}: this config takes no argument")
    is_flag = arg in spec and isinstance(spec[arg], bool)
    arg = f"{arg}=true" if is_flag else f"{first}={arg}"
  raw = {}
  for item in filter(None, (a.strip() for a in arg.split(","))):
    name, _, value = item.partition("=")
    name = name.strip()
    if name not in spec:
      raise ConfigError(f"unknown arg {name!r}.{did_you_mean(name, spec)} It takes: "
                        f"{', '.join(spec) or 'nothing'}")
    raw[name] = value.strip() if "=" in item else "true"
  out = ml_collections.ConfigDict()
  for name, default in spec.items():
    out[name] = _convert(name, raw[name], default) if name in raw else default
    allowed = (choices or {}).get(name)
    if allowed is not None and out[name] not in allowed:
      raise ConfigError(f"arg {name}={out[name]!r} is not one of {list(allowed)}."
                        f"{did_you_mean(out[name], allowed)}")
  return out
