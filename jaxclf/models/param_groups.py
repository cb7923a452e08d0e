"""Which parameters are a model's head and which its backbone, by parameter path, for fine-tuning
(discriminative learning rates, a frozen backbone; jaxclf/train/optimizers.py).

The head is what a new task replaces: the classifier (and the dense layers before it). Everything
else is backbone. Declared per architecture by the top-level module names the models create;
a model not listed here gets the rule by module name ("Dense_*", "classifier", "head").
"""
from __future__ import annotations

import re
from typing import Any

import jax

from jaxclf.config.names import LAYER_DECAY_FAMILIES, PARAM_GROUPS as GROUPS

# Per architecture family (the model name's prefix): the top-level modules that make the head.
HEAD_MODULES: dict[str, re.Pattern] = {
    "cnn": re.compile(r"Dense_\d+$"),  # the classifier and any hidden dense layers
    "vgg": re.compile(r"Dense_\d+$"),
    "resnet": re.compile(r"Dense_\d+$|head$"),
    "efficientnet": re.compile(r"classifier$"),
}
_DEFAULT = re.compile(r"Dense_\d+$|classifier$|head$")

# Backbone depth for layer-wise learning-rate decay: the ordered top-level blocks of each family
# (stem first). A family not listed here has no layer decay (an error names the model).
_BLOCK_INDEX = {
    "resnet": lambda name: (0 if name in ("conv_init", "bn_init")
                            else 1 + int(name.rsplit("_", 1)[1])),
    "efficientnet": lambda name: (0 if name.startswith("stem") else
                                  1 + int(name[len("block"):]) if name.startswith("block")
                                  else None),  # head_conv/head_bn: the last stage, below
}


def family(model_name: str) -> str:
  return next((f for f in HEAD_MODULES if model_name.startswith(f)), "")


def _top(path) -> str:
  return str(getattr(path[0], "key", path[0]))


def group_of(model_name: str, path) -> str:
  rule = HEAD_MODULES.get(family(model_name), _DEFAULT)
  return "head" if rule.match(_top(path)) else "backbone"


def labels(model_name: str):
  """multi_transform's param_labels: a function of the params tree -> the same tree of group
  names."""
  def fn(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(model_name, p), params)
  return fn


def supports_layer_decay(model_name: str) -> bool:
  return family(model_name) in _BLOCK_INDEX


assert set(_BLOCK_INDEX) == set(LAYER_DECAY_FAMILIES), "config/names.py LAYER_DECAY_FAMILIES"


def layer_levels(model_name: str, params) -> tuple[Any, int]:
  """For layer-wise learning-rate decay: (the params tree of each leaf's level, the head's
  level). Level 0 is the stem, then one level per backbone block in forward order; modules after
  the last block (EfficientNet's head_conv/head_bn) share the last backbone level + 1, and the
  head is one above everything."""
  index = _BLOCK_INDEX[family(model_name)]
  names = {_top(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  blocks = {n: index(n) for n in names if group_of(model_name, (n,)) == "backbone"}
  after = max((d for d in blocks.values() if d is not None), default=0) + 1
  head = after + 1
  def level(path, _):
    if group_of(model_name, path) == "head":
      return head
    d = blocks[_top(path)]
    return after if d is None else d
  return jax.tree_util.tree_map_with_path(level, params), head
