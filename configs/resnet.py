"""ResNet-18/34/50 (small-input stem) on Fashion-MNIST.

Command:
  .venv/bin/jaxclf train --config configs/resnet.py:model=resnet18 --workdir runs/r18
  .venv/bin/jaxclf train --config configs/resnet.py:model=resnet18,width=32 --workdir runs/r18w32

Expected: not measured (30 epochs, batch 256: a GPU config; on a 2-core CPU it would take hours).
On CPU the tests run a few steps of `resnet_tiny` as a smoke test.
`arg` (jaxclf.config.parse_arg): model (resnet18|resnet34|resnet50; alone: `resnet.py:resnet34`),
width (num_filters), epochs.
"""
from jaxclf.config import default_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, model="resnet18", width=64, epochs=30,
                choices={"model": ("resnet18", "resnet34", "resnet50")})
  c = default_config()
  c.model.name = a.model
  c.name = c.model.name
  c.model.kwargs.num_filters = a.width
  c.model.kwargs.stem = "small"
  c.train.batch_size = 256
  c.train.num_epochs = a.epochs
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_fraction = 0.05
  c.train.label_smoothing = 0.1
  c.augment.translate = 2
  c.augment.hflip = True
  c.early_stopping.patience = 8
  return c
