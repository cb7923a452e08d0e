"""VGG-11/16 with BatchNorm on Fashion-MNIST (global-average-pool head, see jaxclf/models/vgg.py).

Command:
  .venv/bin/jaxclf train --config configs/vgg.py:vgg11 --workdir runs/vgg11

Expected: not measured (30 epochs: a GPU config);
`vgg_tiny` is what the CPU tests run. `arg` (jaxclf.config.parse_arg): model=vgg11 (default) |
vgg16, or just `vgg.py:vgg16`.
"""
from jaxclf.config import default_config, parse_arg


def get_config(arg: str | None = None):
  name = parse_arg(arg, model="vgg11", choices={"model": ("vgg11", "vgg16")}).model
  c = default_config()
  c.name = name
  c.model.name = name
  c.train.batch_size = 128
  c.train.num_epochs = 30
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_fraction = 0.05
  c.train.label_smoothing = 0.1
  c.early_stopping.patience = 8
  return c
