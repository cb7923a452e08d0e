"""Name -> model constructor. Every model is a Flax Linen module called as
`model.apply(variables, images_nhwc_float32, train=bool)` and returns logits (N, num_classes).

Built-ins register themselves on import of their module; a custom architecture is given as
`package.module:ClassName` and must accept `num_classes` as a keyword argument.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

import flax.linen as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}
_BUILTIN_MODULES = ("cnn", "resnet", "vgg", "efficientnet")


def register_model(name: str, ctor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
  MODELS[name] = ctor
  return ctor


def _load_builtins() -> None:
  for mod in _BUILTIN_MODULES:
    try:
      importlib.import_module(f"jaxclf.models.{mod}")
    except ModuleNotFoundError as e:  # a module still being written must not break the others
      if e.name != f"jaxclf.models.{mod}":
        raise


def model_names() -> list[str]:
  _load_builtins()
  return sorted(MODELS)


def resolve_model(name: str) -> Callable[..., nn.Module]:
  """Returns the constructor for `name`, raising a ValueError that suggests close names."""
  if ":" in name:
    module_name, _, attr = name.partition(":")
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({e})") from None
    if not hasattr(module, attr):
      raise ValueError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
  _load_builtins()
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Known: {', '.join(sorted(MODELS))}, "
                     "or 'package.module:ClassName'.")
  return MODELS[name]


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  return resolve_model(name)(num_classes=num_classes, **kwargs)


def create_model_from_config(config, num_classes: int) -> nn.Module:
  """The model a run config describes: name, kwargs and compute dtype (params stay float32)."""
  kwargs = dict(config.model.kwargs)
  if config.model.dtype != "float32":
    import jax.numpy as jnp
    kwargs["dtype"] = getattr(jnp, config.model.dtype)
  return create_model(config.model.name, num_classes, **kwargs)
