"""Name registries: the names a config may use for optimizers, schedules, built-in models and
evaluator types.

They live here, in the foundation, so that config validation (and search-space validation in
jaxclf/sweeps) checks names without importing the trainer or building any model. The trainer's
tables (train/optimizers.OPTIMIZERS, train/schedules.SCHEDULES) check themselves against these at
import, and tests/test_config.py::test_name_registries_match_the_implementations checks the model
names and arguments against models/registry, so a name added in one place and forgotten in the
other fails loudly.
"""
from __future__ import annotations

OPTIMIZER_NAMES = ("adam", "adamw", "sgd")
SCHEDULE_NAMES = ("constant", "exponential", "one_cycle", "plateau", "step", "warmup_cosine")

_CNN = ("bn_scale", "conv_impl", "conv_init", "dropout", "dtype", "global_pool", "head_scale",
        "hidden", "layers", "stem", "weight_init", "whiten_eps", "whiten_kernel")
# The CNN's string-valued training levers (jaxclf/models/cnn.py) -> their allowed values.
CNN_CHOICES = {"bn_scale": ("learned", "frozen"), "conv_init": ("default", "dirac"),
               "stem": ("conv", "whiten")}
_VGG = ("conv_impl", "dropout", "dtype", "features_only", "layers", "width")
_RESNET = ("act", "block_cls", "conv_impl", "dropout", "dtype", "num_filters", "stage_sizes", "stem")
_EFFICIENTNET = ("bn_momentum", "conv_impl", "depth_coefficient", "drop_connect_rate", "dropout", "dtype",
                 "head_features", "lite", "se_ratio", "stages", "stem_features",
                 "width_coefficient")

# Built-in model name -> the constructor arguments `model.kwargs` may set (num_classes aside).
MODEL_ARGS: dict[str, tuple[str, ...]] = {
    "cnn": _CNN, "cnn_tiny": _CNN,
    "vgg11": _VGG, "vgg16": _VGG, "vgg_tiny": _VGG,
    "resnet18": _RESNET, "resnet34": _RESNET, "resnet50": _RESNET, "resnet_tiny": _RESNET,
    "efficientnet_b0": _EFFICIENTNET, "efficientnet_lite0": _EFFICIENTNET,
    "efficientnet_tiny": _EFFICIENTNET,
}


# Evaluator type (config.evals.<name>.type) -> the fields an entry of that type may set
# (jaxclf/train/evaluators.py implements them; `enabled` switches an entry off).
EVALUATOR_ARGS: dict[str, tuple[str, ...]] = {
    "classification": ("enabled", "split", "tta_flip", "type", "when"),
    "calibration": ("enabled", "report_split", "split", "type", "when"),
}


# Fine-tuning param groups (jaxclf/models/param_groups.py assigns each parameter to one), and the
# model families whose blocks have a declared order for layer-wise learning-rate decay.
PARAM_GROUPS = ("backbone", "head")
LAYER_DECAY_FAMILIES = ("efficientnet", "resnet")


def parse_lr_mults(spec: str) -> dict[str, float]:
  """optimizer.lr_mults 'backbone=0.1,head=1' -> {'backbone': 0.1, 'head': 1.0}."""
  out = {}
  for item in filter(None, (x.strip() for x in str(spec or "").split(","))):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"optimizer.lr_mults: {item!r} is not group=multiplier")
    if name not in PARAM_GROUPS:
      raise ValueError(f"optimizer.lr_mults: unknown param group {name!r}; the groups are "
                       f"{list(PARAM_GROUPS)}")
    try:
      out[name] = float(value)
    except ValueError:
      raise ValueError(f"optimizer.lr_mults: {name}={value!r} is not a number") from None
    if out[name] < 0:
      raise ValueError(f"optimizer.lr_mults: {name}={value} must be >= 0")
  return out


def check_table(kind: str, implemented, names) -> None:
  """Called by the trainer's tables at import: they must implement exactly the registered names."""
  if set(implemented) != set(names):
    raise RuntimeError(f"{kind} table {sorted(implemented)} differs from the name registry "
                       f"jaxclf/config/names.py {sorted(names)}: update both together")
