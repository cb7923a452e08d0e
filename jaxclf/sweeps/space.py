"""Search spaces: what a config file's `get_sweep(name)` returns, checked before any trial starts.

A sweep (big_vision style, beside get_config in the same file):

  def get_sweep(name):
    return {
        "sampler": "tpe",            # grid | random | tpe
        "trials": 16, "seed": 0,
        "pruner": "asha",            # none | median | asha (successive halving); --pruner overrides
        "metric": "val_accuracy",    # val_accuracy (max) | val_loss (min): validation only
        "set": {"train.num_epochs": 3},          # fixed overrides for every trial
        "space": {
            "optimizer.learning_rate": {"float": (1e-3, 0.4), "log": True},
            "train.batch_size": {"categorical": [64, 128, 256]},
            "model.kwargs.dropout": {"float": (0.0, 0.5)},
            "optimizer.name": {"categorical": ["sgd", "adamw"]},
            # conditional: suggested (and set) only when optimizer.name is sgd
            "optimizer.momentum": {"float": (0.8, 0.99), "when": {"optimizer.name": "sgd"}},
        },
    }

Each parameter is one of Optuna's suggest_* calls: {"float": (lo, hi), "log"?, "step"?},
{"int": (lo, hi), "log"?, "step"?} or {"categorical": [...]}. The grid sampler takes only
categorical parameters without "when" (every combination). The older shapes
{"grid": {key: [values]}} and {"random": {key: ("log_uniform"|"uniform", lo, hi) |
("choice", [...])}, "trials": N, "seed": S} are read as the same thing.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
from typing import Any

from jaxclf.config import ConfigError, set_dotted, validate

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "asha")
METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
_KINDS = ("float", "int", "categorical")


class SpaceError(ConfigError):
  """A bad sweep definition; the message names the sweep and the parameter."""


def load_sweep(config_path: str, name: str) -> dict[str, Any]:
  """get_sweep(name) from the config file `path[:arg]` (the ':arg' picks the config, not the sweep)."""
  path = config_path.partition(":")[0]
  spec = importlib.util.spec_from_file_location("_jaxclf_sweep", path)
  if spec is None:
    raise SpaceError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SpaceError(f"{path} defines no get_sweep(name)")
  try:
    sweep = module.get_sweep(name)
  except (KeyError, ValueError) as e:
    raise SpaceError(f"{path}: get_sweep({name!r}): {e}") from None
  if not isinstance(sweep, dict):
    raise SpaceError(f"{path}: get_sweep({name!r}) must return a dict, got {type(sweep).__name__}")
  return normalize(sweep, f"{path}:get_sweep({name!r})")


def _legacy(sweep: dict[str, Any]) -> dict[str, Any]:
  if "grid" in sweep:
    space = {k: {"categorical": list(v)} for k, v in sweep["grid"].items()}
    return {"sampler": "grid", **{k: v for k, v in sweep.items() if k != "grid"}, "space": space}
  space = {}
  for key, dist in sweep["random"].items():
    kind = dist[0] if isinstance(dist, (tuple, list)) and dist else None
    if kind == "log_uniform":
      space[key] = {"float": (dist[1], dist[2]), "log": True}
    elif kind == "uniform":
      space[key] = {"float": (dist[1], dist[2])}
    elif kind == "choice":
      space[key] = {"categorical": list(dist[1])}
    else:
      space[key] = {"bad distribution": dist}  # reported by _check_param
  return {"sampler": "random", **{k: v for k, v in sweep.items() if k != "random"}, "space": space}


def normalize(sweep: dict[str, Any], where: str) -> dict[str, Any]:
  """A checked, filled-in sweep dict; SpaceError naming `where` and the key otherwise."""
  if "grid" in sweep or "random" in sweep:
    sweep = _legacy(sweep)
  known = {"sampler", "trials", "seed", "pruner", "metric", "space", "set", "trials"}
  for key in sweep:
    if key not in known:
      raise SpaceError(f"{where}: unknown sweep key {key!r} (known: {', '.join(sorted(known))})")
  out = {"sampler": sweep.get("sampler", "tpe"), "seed": int(sweep.get("seed", 0)),
         "pruner": sweep.get("pruner", "none"), "metric": sweep.get("metric", "val_accuracy"),
         "set": dict(sweep.get("set") or {}), "space": dict(sweep.get("space") or {})}
  if out["sampler"] not in SAMPLERS:
    raise SpaceError(f"{where}: sampler {out['sampler']!r} is not one of {list(SAMPLERS)}")
  if out["pruner"] not in PRUNERS:
    raise SpaceError(f"{where}: pruner {out['pruner']!r} is not one of {list(PRUNERS)}")
  if out["metric"] not in METRICS:
    raise SpaceError(f"{where}: metric {out['metric']!r} is not one of {list(METRICS)} "
                     "(selection uses validation only)")
  if not out["space"]:
    raise SpaceError(f"{where}: the search space is empty")
  for key, param in out["space"].items():
    _check_param(where, key, param, out)
  if out["sampler"] == "grid":
    n = math.prod(len(p["categorical"]) for p in out["space"].values())
    out["trials"] = int(sweep.get("trials", n))
  else:
    out["trials"] = int(sweep.get("trials", 8))
  if out["trials"] < 1:
    raise SpaceError(f"{where}: trials must be >= 1, got {out['trials']}")
  return out


def _check_param(where: str, key: str, p: Any, sweep: dict[str, Any]) -> None:
  name = f"{where}: space[{key!r}]"
  kinds = [k for k in _KINDS if isinstance(p, dict) and k in p]
  if len(kinds) != 1:
    raise SpaceError(f"{name}: expected one of {{'float': (lo, hi)}}, {{'int': (lo, hi)}} or "
                     f"{{'categorical': [...]}}, got {p!r}")
  kind = kinds[0]
  extra = set(p) - {kind, "log", "step", "when"}
  if extra:
    raise SpaceError(f"{name}: unknown field(s) {sorted(extra)} (allowed: log, step, when)")
  if kind == "categorical":
    if not isinstance(p[kind], (list, tuple)) or not p[kind]:
      raise SpaceError(f"{name}: categorical needs a non-empty list of choices")
    if p.get("log") or p.get("step"):
      raise SpaceError(f"{name}: log/step apply to float and int parameters only")
  else:
    bounds = p[kind]
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
      raise SpaceError(f"{name}: {kind} needs (low, high) numbers, got {bounds!r}")
    lo, hi = bounds
    if not lo < hi:
      raise SpaceError(f"{name}: low must be < high, got ({lo}, {hi})")
    if p.get("log") and lo <= 0:
      raise SpaceError(f"{name}: a log-scaled range needs low > 0, got {lo}")
    if p.get("log") and p.get("step"):
      raise SpaceError(f"{name}: log and step cannot be combined (Optuna's rule)")
  when = p.get("when")
  if when is not None:
    if not isinstance(when, dict) or not when:
      raise SpaceError(f"{name}: 'when' must map a parameter to its value(s), got {when!r}")
    for parent in when:
      if parent not in sweep["space"] or parent == key:
        raise SpaceError(f"{name}: 'when' refers to {parent!r}, which is not another parameter "
                         "of this space")
  if sweep["sampler"] == "grid" and (kind != "categorical" or when is not None):
    raise SpaceError(f"{name}: the grid sampler needs categorical parameters without 'when'")


def _suggest_choice(trial, key: str, choices: list[Any]) -> Any:
  """Optuna's categorical choices are scalars; list choices (e.g. model.kwargs.layers) go through
  their JSON text and come back as tuples."""
  if not any(isinstance(c, (list, tuple, dict)) for c in choices):
    return trial.suggest_categorical(key, choices)
  text = trial.suggest_categorical(key, [json.dumps(c) for c in choices])
  return _tuples(json.loads(text))


def _tuples(v: Any) -> Any:
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def corners(sweep: dict[str, Any]) -> list[dict[str, Any]]:
  """Extreme assignments of the space (each bound, each choice): every one must make a valid
  config, so a typo'd path or an out-of-range bound fails before the first trial."""
  options = {}
  for key, p in sweep["space"].items():
    if "categorical" in p:
      options[key] = list(p["categorical"])
    else:
      lo, hi = p["float"] if "float" in p else p["int"]
      options[key] = [lo, hi]
  keys = list(options)
  combos = list(itertools.product(*(options[k] for k in keys)))
  if len(combos) > 256:  # the bounds of each parameter, one at a time, beside the first corner
    base = {k: options[k][0] for k in keys}
    return [base] + [{**base, k: v} for k in keys for v in options[k][1:]]
  return [dict(zip(keys, c)) for c in combos]


def active(sweep: dict[str, Any], assignment: dict[str, Any]) -> dict[str, Any]:
  """The parameters of `assignment` whose 'when' conditions hold (conditional parameters)."""
  out = {}
  for key, value in assignment.items():
    when = sweep["space"][key].get("when") or {}
    if all(_matches(assignment.get(parent), want) for parent, want in when.items()):
      out[key] = value
  return out


def _matches(value: Any, want: Any) -> bool:
  return value in want if isinstance(want, (list, tuple)) else value == want


def apply_overrides(config, overrides: dict[str, Any], where: str):
  """A copy of `config` with dotted overrides set and validated; SpaceError names the key."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    try:
      set_dotted(config, key, value)
    except ConfigError as e:
      raise SpaceError(f"{where}: parameter {key!r}: {e}") from None
  try:
    validate(config)
  except ConfigError as e:
    raise SpaceError(f"{where}: with {overrides}: {e}") from None
  return config


def check_against_config(sweep: dict[str, Any], config, where: str) -> None:
  """Every path exists and every corner of the space makes a valid config."""
  base = apply_overrides(config, sweep["set"], f"{where} 'set'")
  for corner in corners(sweep):
    apply_overrides(base, active(sweep, corner), where)


def suggest(trial, sweep: dict[str, Any]) -> dict[str, Any]:
  """Draws the trial's parameters with Optuna's suggest_* calls, conditional ones only when their
  condition holds (Optuna's define-by-run conditional spaces)."""
  drawn: dict[str, Any] = {}
  pending = dict(sweep["space"])
  while pending:  # parents before children, whatever order the space was written in
    progressed = False
    for key, p in list(pending.items()):
      when = p.get("when") or {}
      if any(parent in pending for parent in when):
        continue
      del pending[key]
      progressed = True
      if not all(_matches(drawn.get(parent), want) for parent, want in when.items()):
        continue
      if "categorical" in p:
        drawn[key] = _suggest_choice(trial, key, list(p["categorical"]))
      elif "float" in p:
        drawn[key] = trial.suggest_float(key, *p["float"], log=bool(p.get("log")),
                                         step=p.get("step"))
      else:
        drawn[key] = trial.suggest_int(key, *p["int"], log=bool(p.get("log")),
                                       step=p.get("step") or 1)
    if not progressed:
      raise SpaceError(f"space: circular 'when' conditions among {sorted(pending)}")
  return drawn
