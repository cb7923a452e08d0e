"""Transfer learning: EfficientNet-Lite0's ImageNet weights fine-tuned on Fashion-MNIST.

Commands:
  .venv/bin/jaxclf train --config configs/transfer.py --workdir runs/tl            # 2,000 images
  .venv/bin/jaxclf train --config configs/transfer.py:few_shot --workdir runs/tl100 \\
      --set data.limit_per_class=10                                               # 100 images
  .venv/bin/jaxclf train --config configs/transfer.py:full --workdir runs/tl_full   # 60,000
  .venv/bin/python bench/transfer_curve.py --headline         # the data-efficiency curve

The recipe (jaxclf/train/finetune.py, jaxclf/train/optimizers.py):
  - input adaptation in the shared preprocessing spec, so export and serving follow: the grey
    image at the weights' own normalisation (mean 127/255, std 128/255 on every channel, from the
    catalogue in jaxclf/models/pretrained.py; not the 0.485/0.229 ImageNet statistics), resized
    28 -> 64 px bicubic; the RGB stem summed over its input channels (exactly the RGB stem on the
    grey image repeated three times, at a third of the stem's cost);
  - a new 10-class head (model.pretrained=imagenet keeps every backbone array and BatchNorm
    statistic; run.json records the file, its sha256 and that the head was replaced);
  - train.freeze_backbone_epochs=2: the head alone, with the backbone in inference mode (BatchNorm
    running statistics) and exactly frozen; train.cache_frozen_features=True makes those epochs a
    linear probe on features computed once per image. Those features are of the UN-augmented
    image: augmentation (+-4 px shifts, flips) only applies once everything unfreezes;
  - then everything trains, the backbone at 0.1x the head's learning rate (optimizer.lr_mults),
    with BatchNorm kept on the ImageNet statistics (train.freeze_batchnorm: the forward stays in
    inference mode, so dropout and stochastic depth are off too). Both are needed: with BatchNorm
    back on batch statistics after unfreezing, or with a 5x higher rate, the first unfrozen steps
    wrecked the probe's features and validation accuracy fell below the probe's.

64 px rather than the weights' 224: Lite0 downsamples 32x, so 64 px gives a 2x2 final map (28 px
would give 1x1) at (64/224)^2 = 8% of the native cost; on a CPU that is what lets the curve fit
(see bench/transfer_curve.py for the budget; bench/lite0_step.py measures the step).

Variants (`arg`):
  (none)    2,000 training images (data.limit_per_class=200, stratified, seeded), batch 64, 12
            epochs (2 frozen), validation on 1% of train: the curve's 2,000-image point.
  few_shot  100 images (10 per class), batch 12, otherwise the same: the curve's 100-image point.
            `--set data.limit_per_class=N` for N per class (scale the batch with it).
  full      the whole train split (60,000 minus validation), batch 128, 6 epochs (2 frozen).
The learning rate is scaled linearly with the batch (0.01 at batch 128).

Expected (`bench/transfer_curve.py --headline` on a 2-core CPU, 2026-12-02: docs/transfer_curve.json,
docs/results.md; single view, best-by-validation checkpoint):
  (none)    84.2% on the full 10,000-image test split (95% bootstrap CI 83.5-84.9), 84.2% on
            the curve's 2,000-image stratified test subset; 629 s of training. Beside it at 2,000
            images: Lite0 from scratch 79.4%, the anchor CNN (configs/cnn.py:anchor) 86.8%.
  few_shot  66.1% and 68.7% (seeds 0, 1; 2,000-image test subset); 127-143 s of training.
            Lite0 from scratch 27.5% / 33.6%, the anchor CNN 69.6% / 65.2%.
  full      not measured (4 unfrozen epochs x 60,000 images: hours on a 2-core CPU).

Augmentation: timm's families did not help here. `bench/recipe.py --suite transfer100` and
`--suite transfer500` (bench/README.md; validation only, 3 seeds per arm) added RandAugment
(m9, mstd 0.5), TrivialAugment, Mixup 0.8 + CutMix 1.0 and Random Erasing 0.25, alone and all
together: none beats the committed shifts and flips by more than the seed spread (100 images:
70.8% +- 1.1 validation, 67.5% +- 1.1 test; 500 images: 80.4% +- 0.8 validation, 78.4% +- 0.7
test), Mixup + CutMix costs 1.4 / 2.2 points and all four together 4.6 / 4.1 at these 12
epochs. So the recipe keeps its augmentation; the families are one `--set` away
(docs/augmentation.md) for longer schedules.
"""
from jaxclf.config import default_config, parse_arg
from jaxclf.models.pretrained import PRETRAINED

WEIGHTS = PRETRAINED["efficientnet_lite0"]


def lite0_finetune(c, size: int = 64, channels: int = 1) -> None:
  """Lite0 + its ImageNet weights with their own preprocessing and the fine-tuning schedule."""
  c.model.name = "efficientnet_lite0"
  c.model.pretrained = "imagenet"
  c.data.channels = channels
  c.preprocessing.image_size = size
  c.preprocessing.mean = (WEIGHTS.mean,) * channels
  c.preprocessing.std = (WEIGHTS.std,) * channels
  c.preprocessing.resize = WEIGHTS.resize
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  # Fine-tuning's rate: 5x below the from-scratch 0.05 of this optimizer; at 0.05 the linear
  # probe on Lite0's 1,280 features overshoots (val loss 3.1 at 72% accuracy, 500 images) and the
  # first unfrozen steps wreck the backbone (val accuracy 0.74 -> 0.27).
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 5e-5
  c.optimizer.lr_mults = "backbone=0.1"
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_fraction = 0.05
  c.train.label_smoothing = 0.1
  c.train.freeze_backbone_epochs = 2
  c.train.cache_frozen_features = True
  # BatchNorm stays on the ImageNet running statistics after unfreezing too: a small batch's own
  # statistics (64 px Fashion-MNIST, 12-64 images) are far from them, and switching to them
  # wrecked the features at any learning rate (val 0.77 -> 0.49 at 500 images, lr 0.01).
  c.train.freeze_batchnorm = True


def get_config(arg: str | None = None):
  a = parse_arg(arg, variant="", choices={"variant": ("", "few_shot", "full")})
  c = default_config()
  c.name = "transfer_lite0"
  lite0_finetune(c, 64)
  c.preprocessing.crop_fraction = 1.0  # Fashion-MNIST objects fill the frame: no 87.5% crop
  c.augment.translate = 4  # the +-2 px of the 28 px original, at 64 px
  c.augment.hflip = True
  # full: the whole train split at the recipe's own batch (the learning rates are for batch 128).
  c.train.batch_size = 128
  c.train.num_epochs = 6
  if a.variant == "full":
    return c
  # The curve's points (bench/transfer_curve.py builds its pretrained arm from `full` the same
  # way; tests/test_transfer.py checks that they agree): a stratified subset, 12 epochs of which
  # 2 frozen, validation on 1% of train (600 images), the learning rate scaled to the batch.
  per_class, batch = (10, 12) if a.variant == "few_shot" else (200, 64)
  c.name = "transfer_lite0_few_shot" if a.variant == "few_shot" else "transfer_lite0_2000"
  c.data.limit_per_class = per_class
  c.data.val_fraction = 0.01
  c.optimizer.learning_rate *= batch / c.train.batch_size
  c.train.batch_size = batch
  c.train.num_epochs = 12
  c.periodic.log = "1 epochs"
  c.periodic.checkpoint = "100%"
  c.evals.val.when = "2 epochs"
  return c
