"""Config validation: one clear message naming the field, before any compute.

Names (optimizers, schedules, models) come from the name registries in jaxclf/config/names.py:
config is a foundation and imports neither the trainer nor the model constructors."""
from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from jaxclf.config.defaults import default_config
from jaxclf.config.names import (CNN_CHOICES, EVALUATOR_ARGS, MODEL_ARGS, OPTIMIZER_NAMES,
                                 SCHEDULE_NAMES, LAYER_DECAY_FAMILIES, parse_lr_mults)
from jaxclf.config.periodic import Every, RuleError


class ConfigError(ValueError):
  """A config problem, always naming the dotted key."""


def did_you_mean(value, options) -> str:
  """' Did you mean 'x'?' for the closest of `options`, or ''."""
  close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
  return f" Did you mean {close[0]!r}?" if close else ""


# Keys that periodic rules replaced: a config still using one is told where it went.
MOVED = {"train.log_every_steps": "periodic.log (e.g. '50 steps')",
         "train.checkpoint_every_steps": "periodic.checkpoint (e.g. '200 steps')",
         "train.eval_every_epochs": "evals.val.when (e.g. '1 epochs')"}


def check_known_key(node: ml_collections.ConfigDict, key: str, dotted: str) -> None:
  if key not in node and dotted in MOVED:
    raise ConfigError(f"{dotted} is now {MOVED[dotted]}: a periodic rule, '<N> steps', "
                      "'<N> epochs' or '<N>%'")
  if key not in node:
    close = difflib.get_close_matches(key, list(node.keys()), n=1, cutoff=0.6)
    hint = f" Did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{close[0]}?" if close else ""
    raise ConfigError(f"unknown config key {dotted!r}.{hint}")


def coerce(old: Any, new: Any, dotted: str) -> Any:
  """`new` converted to the type of the value it replaces, or a ConfigError."""
  if old is None or isinstance(old, ml_collections.ConfigDict):
    return new
  if isinstance(new, str) and isinstance(old, (int, float)) and not isinstance(old, bool):
    try:  # YAML reads '1e-3' as a string (YAML 1.1 wants '1.0e-3'); accept it as a number
      new = float(new) if isinstance(old, float) else int(new)
    except ValueError:
      pass
  if isinstance(old, bool):
    if isinstance(new, bool):
      return new
    raise ConfigError(f"{dotted}: expected true/false, got {new!r}")
  if isinstance(old, int):
    if isinstance(new, bool) or not isinstance(new, (int, float)) or int(new) != new:
      raise ConfigError(f"{dotted}: expected an integer, got {new!r}")
    return int(new)
  if isinstance(old, float):
    if isinstance(new, bool) or not isinstance(new, (int, float)):
      raise ConfigError(f"{dotted}: expected a number, got {new!r}")
    return float(new)
  if isinstance(old, str):
    if new is None:  # `--config.model.pretrained=` (empty) parses as YAML null
      return ""
    if isinstance(new, bool):  # `--set data.on_device=false` parses as a YAML boolean
      return "true" if new else "false"
    if not isinstance(new, str):
      if isinstance(new, (int, float)) and not isinstance(new, bool):
        return str(new)
      raise ConfigError(f"{dotted}: expected a string, got {new!r}")
    return new
  if isinstance(old, (tuple, list)):
    if isinstance(new, (int, float)) and not isinstance(new, bool):
      new = [new]
    if not isinstance(new, (tuple, list)):
      raise ConfigError(f"{dotted}: expected a list, got {new!r}")
    return tuple(new)
  return new


# key -> (low, high) inclusive; None = unbounded.
RANGES = {
    "data.val_fraction": (0.0, 0.9), "data.test_fraction": (0.0, 0.9),
    "data.read_threads": (0, 64), "data.prefetch_batches": (1, 1024),
    "data.worker_processes": (0, 64), "data.max_pixels": (1, None), "data.limit_per_split": (0, None),
    "data.limit_per_class": (0, None), "train.freeze_backbone_epochs": (0, 100_000),
    "train.ema.every": (1, 1_000_000),
    "preprocessing.image_size": (8, 4096), "preprocessing.crop_fraction": (0.05, 1.0),
    "augment.translate": (0, 64), "augment.rotation": (0.0, 180.0),
    "augment.brightness": (0.0, 1.0), "augment.contrast": (0.0, 1.0), "augment.saturation": (0.0, 1.0),
    "augment.auto_num_ops": (1, 16), "augment.auto_magnitude": (0.0, 10.0),
    "augment.auto_magnitude_std": (0.0, None), "augment.auto_prob": (0.0, 1.0),
    "augment.random_erasing": (0.0, 1.0), "augment.mixup": (0.0, 100.0),
    "augment.cutmix": (0.0, 100.0), "augment.mix_prob": (0.0, 1.0),
    "augment.mix_switch_prob": (0.0, 1.0),
    "optimizer.learning_rate": (0.0, 100.0), "optimizer.momentum": (0.0, 1.0),
    "optimizer.b1": (0.0, 1.0), "optimizer.b2": (0.0, 1.0), "optimizer.weight_decay": (0.0, 1.0),
    "optimizer.grad_clip_norm": (0.0, None), "optimizer.eps": (0.0, 1.0),
    "optimizer.layer_decay": (0.0, 1.0), "optimizer.bias_lr_mult": (0.0, 1000.0),
    "schedule.warmup_fraction": (0.0, 1.0), "schedule.final_fraction": (0.0, 1.0),
    "schedule.decay_rate": (0.0, 1.0), "schedule.plateau_patience": (1, 1000),
    "schedule.plateau_factor": (0.0, 1.0),
    "train.batch_size": (1, 1 << 20), "train.num_epochs": (1, 100_000),
    "train.label_smoothing": (0.0, 0.99), "train.keep_checkpoints": (1, 1000),
    "train.eval_batch_size": (1, 1 << 20), "train.grad_accum_steps": (1, 4096),
    "distributed.num_processes": (1, 1 << 16), "distributed.process_id": (0, 1 << 16),
    "distributed.init_timeout_s": (1, None), "distributed.heartbeat_timeout_s": (1, None),
    "train.max_steps": (0, None), "early_stopping.patience": (0, None),
    "early_stopping.min_delta": (0.0, None), "seed": (0, 2**31 - 1), "data.split_seed": (0, 2**31 - 1),
}
CHOICES = {
    "data.channels": (1, 3), "data.sampler": ("shuffle", "balanced"),
    "preprocessing.resize": ("nearest", "bilinear", "bicubic", "lanczos"),
    "model.dtype": ("float32", "bfloat16", "float16"), "train.class_weights": ("none", "balanced"),
    "early_stopping.metric": ("val_accuracy", "val_loss"),
    "model.conv_impl": ("auto", "xla", "matmul", "onednn"),
    "data.on_device": ("auto", "true", "false"), "schedule.anneal": ("linear", "cos"),
    "augment.auto": ("", "randaugment", "trivialaugment"), "augment.mix_mode": ("batch", "elem"),
    "augment.erasing_mode": ("pixel", "const"), "augment.hflip_mode": ("random", "alternate"),
}


def _walk(ref: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, prefix: str = ""):
  for key in cfg.keys():
    dotted = f"{prefix}{key}"
    check_known_key(ref, key, dotted)
    if key in ("kwargs", "evals"):  # free-form: the model / check_evals check them
      continue
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"{dotted}: expected a section, got {cfg[key]!r}")
      _walk(ref[key], cfg[key], dotted + ".")
    else:
      coerce(ref[key], cfg[key], dotted)


def _choose(value: Any, choices, dotted: str) -> None:
  if value not in choices:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{dotted}: {value!r} is not one of {list(choices)}.{hint}")


def _custom_model_args(name: str) -> tuple[str, ...] | None:
  """`package.module:ClassName`: the user's own module is imported (nothing of jaxclf's models);
  returns its dataclass fields, or None for a plain factory (its own signature will check)."""
  import dataclasses
  import importlib
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"model.name: model {name!r}: cannot import module {module_name!r} ({e})"
                      ) from None
  if not hasattr(module, attr):
    raise ConfigError(f"model.name: model {name!r}: module {module_name!r} has no attribute "
                      f"{attr!r}")
  ctor = getattr(module, attr)
  cls = getattr(ctor, "func", ctor)  # functools.partial variants
  if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
    return None
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name",
                                                                         "num_classes"))


def check_model(name: str, kwargs: dict) -> None:
  """model.name is a registered built-in (jaxclf/config/names.py) or `package.module:Class`;
  model.kwargs must be constructor arguments of that model (e.g. after --config.model.name=)."""
  if ":" in name:
    fields = _custom_model_args(name)
  elif name in MODEL_ARGS:
    fields = MODEL_ARGS[name]
  else:
    close = difflib.get_close_matches(name, MODEL_ARGS, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"model.name: unknown model {name!r}.{hint} Known: "
                      f"{', '.join(sorted(MODEL_ARGS))}, or 'package.module:ClassName'.")
  if fields is None:
    return
  unknown = [key for key in kwargs if key not in fields]
  if len(unknown) == 1:
    key = unknown[0]
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"model.kwargs.{key}: model {name!r} takes no argument {key!r}.{hint} "
                      f"It takes: {', '.join(sorted(fields))}")
  if unknown:  # all at once: typically the previous model's kwargs after model.name=...
    raise ConfigError(f"{', '.join('model.kwargs.' + k for k in unknown)}: model {name!r} takes "
                      f"no argument {', '.join(map(repr, unknown))} (model.kwargs={{}} drops them). "
                      f"It takes: {', '.join(sorted(fields))}")


CNN_RANGES = {"head_scale": (0.0, 1000.0), "whiten_kernel": (1, 7), "whiten_eps": (0.0, 1.0)}


def _check_cnn_kwargs(kwargs: dict) -> None:
  """The CNN's training levers: choices (names.CNN_CHOICES) and ranges, before any compute."""
  for key, choices in CNN_CHOICES.items():
    if key in kwargs:
      _choose(kwargs[key], choices, f"model.kwargs.{key}")
  for key, (lo, hi) in CNN_RANGES.items():
    if key not in kwargs:
      continue
    value, integer = kwargs[key], key == "whiten_kernel"
    if isinstance(value, str) and not integer:  # YAML reads "5e-4" (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) \
        and (lo <= value <= hi if integer else lo < value <= hi)
    if not ok:
      what = f"an integer in [{lo}, {hi}]" if integer else f"a number in ({lo}, {hi}]"
      raise ConfigError(f"model.kwargs.{key}: {value!r} is not {what}")


def _check_rule(rule, dotted: str, allow_end: bool = False) -> None:
  if allow_end and rule == "end":
    return
  try:
    Every.parse(rule)
  except RuleError as e:
    raise ConfigError(f"{dotted}: {e}" + (", or 'end'" if allow_end else "")) from None


def check_evals(evals: ml_collections.ConfigDict, selection: str) -> None:
  """Each config.evals entry: a known type, only that type's fields, a valid `when`; the
  selection evaluator (early_stopping.metric's) exists, is enabled and runs periodically."""
  for name, entry in evals.items():
    dotted = f"evals.{name}"
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ConfigError(f"{dotted}: expected a section (type, when, ...), got {entry!r}")
    _choose(entry.get("type"), sorted(EVALUATOR_ARGS), f"{dotted}.type")
    fields = EVALUATOR_ARGS[entry.type]
    for key in entry.keys():
      if key not in fields:
        raise ConfigError(f"{dotted}.{key}: evaluator type {entry.type!r} takes no field "
                          f"{key!r}.{did_you_mean(key, fields)} It takes: {', '.join(fields)}")
    _check_rule(entry.get("when", ""), f"{dotted}.when", allow_end=True)
  sel = evals.get(selection)
  if sel is None or not sel.get("enabled", True) or sel.get("when") in ("end", "", None):
    raise ConfigError(f"evals.{selection}: early_stopping.metric selects by it, so it must be an "
                      "enabled evaluator with a periodic `when` (e.g. '1 epochs')")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unknown keys, wrong types, out-of-range values or unknown names."""
  _walk(default_config(), config)
  for dotted, (lo, hi) in RANGES.items():
    section, _, key = dotted.rpartition(".")
    value = config[section][key] if section else config[key]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
      rng = f"[{lo}, {hi if hi is not None else 'inf'}]"
      raise ConfigError(f"{dotted}: {value!r} is out of range {rng}")
  for dotted, choices in CHOICES.items():
    section, _, key = dotted.rpartition(".")
    _choose(config[section][key], choices, dotted)
  _choose(config.optimizer.name, sorted(OPTIMIZER_NAMES), "optimizer.name")
  _choose(config.schedule.name, sorted(SCHEDULE_NAMES), "schedule.name")
  check_model(config.model.name, dict(config.model.kwargs))
  if config.model.name in ("cnn", "cnn_tiny"):
    _check_cnn_kwargs(dict(config.model.kwargs))
  try:
    parse_lr_mults(config.optimizer.lr_mults)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.optimizer.layer_decay > 0 and not config.model.name.startswith(LAYER_DECAY_FAMILIES):
    raise ConfigError(f"optimizer.layer_decay: model {config.model.name!r} declares no layer "
                      f"order (only {', '.join(LAYER_DECAY_FAMILIES)} do); use 0")
  _check_fine_tuning(config)
  _check_ema(config.train.ema)
  for key, rule in config.periodic.items():
    _check_rule(rule, f"periodic.{key}")
  check_evals(config.evals, config.early_stopping.metric.rsplit("_", 1)[0])
  c = config.data.channels
  for key in ("mean", "std"):
    if len(config.preprocessing[key]) != c:
      raise ConfigError(f"preprocessing.{key}: needs {c} value(s) for data.channels={c}, "
                        f"got {list(config.preprocessing[key])}")
  if any(s <= 0 for s in config.preprocessing.std):
    raise ConfigError("preprocessing.std: values must be > 0")
  lo, hi = config.augment.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ConfigError(f"augment.crop_scale: need 0 < low <= high <= 1, got {(lo, hi)}")
  _check_augment(config)
  if config.data.val_fraction + config.data.test_fraction >= 1:
    raise ConfigError("data.val_fraction + data.test_fraction must be < 1")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError(f"train.batch_size={config.train.batch_size} does not split into "
                      f"train.grad_accum_steps={config.train.grad_accum_steps} micro-batches: use "
                      "a multiple of it (x the device count)")


def _check_ema(ema: ml_collections.ConfigDict) -> None:
  """decay in [0, 1): 1 would keep the initial weights for ever, and serve them."""
  if not 0.0 <= ema.decay < 1.0:
    raise ConfigError(f"train.ema.decay: {ema.decay!r} is out of range [0, 1): the average's "
                      "share kept per step (e.g. 0.999), or 0 for off")


def _check_fine_tuning(config: ml_collections.ConfigDict) -> None:
  """model.pretrained_sha256, train.freeze_backbone_epochs, train.cache_frozen_features."""
  pin = config.model.pretrained_sha256
  if pin and not (len(pin) == 64 and all(ch in "0123456789abcdefABCDEF" for ch in pin)):
    raise ConfigError(f"model.pretrained_sha256: expected 64 hex digits, got {pin!r}")
  if pin and not config.model.pretrained:
    raise ConfigError("model.pretrained_sha256 pins a file, but model.pretrained is empty")
  if config.train.freeze_backbone_epochs > config.train.num_epochs:
    raise ConfigError(f"train.freeze_backbone_epochs={config.train.freeze_backbone_epochs} is "
                      f"more than train.num_epochs={config.train.num_epochs} (equal: a linear "
                      "probe, the backbone never trains)")
  if config.train.cache_frozen_features and config.train.freeze_backbone_epochs == 0:
    raise ConfigError("train.cache_frozen_features caches the frozen backbone's features: it "
                      "needs train.freeze_backbone_epochs > 0")


def _check_augment(config: ml_collections.ConfigDict) -> None:
  """The timm-style families: op names, the erasing box ranges, a batch to mix within."""
  aug, known = config.augment, default_config().augment.auto_ops
  if not aug.auto_ops:
    raise ConfigError(f"augment.auto_ops: needs at least one op of {list(known)}")
  for op in aug.auto_ops:
    if op not in known:
      raise ConfigError(f"augment.auto_ops: {op!r} is not an op.{did_you_mean(op, known)} "
                        f"Ops: {', '.join(known)}")
  for key, top in (("erasing_area", 1.0), ("erasing_ratio", None)):
    values = tuple(aug[key])
    if len(values) != 2 or not 0 < values[0] <= values[1] or (top and values[1] >= top):
      bound = "< 1" if top else ""
      raise ConfigError(f"augment.{key}: need two numbers 0 < low <= high {bound}, got "
                        f"{list(values)}".replace("  ", " "))
  if aug.hflip_mode == "alternate" and not aug.hflip:
    raise ConfigError("augment.hflip_mode: 'alternate' decides how augment.hflip flips; it needs "
                      "augment.hflip=true (or use 'random')")
  mixing = [k for k in ("mixup", "cutmix") if aug[k] > 0]
  if mixing and config.train.batch_size < 2:
    raise ConfigError(f"augment.{mixing[0]}: Mixup/CutMix mix each example with another of its "
                      f"batch; train.batch_size={config.train.batch_size} has none (use >= 2)")
