"""Every key a run config may have, with its default. Config files start from `default_config()`
and change what they need, so validation can name any unknown key and suggest the right one."""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"  # the run's name in run.json, runs list/compare and MLflow (the experiment)
  c.seed = 0  # init, dropout, augmentation and data order; same seed + config = same run

  c.data = ml_collections.ConfigDict()
  c.data.source = "fashion_mnist"  # 'fashion_mnist' | class-per-folder dir | ingested dataset dir/URL
  c.data.val_fraction = 0.1  # carved from train (stratified) when the source has no val split
  c.data.test_fraction = 0.1  # used only when the source has no test split
  c.data.split_seed = 0  # draws the val/test carve-outs and limit_per_class subsets
  c.data.channels = 1  # 1 = grey, 3 = RGB: images are converted to this on decode
  c.data.max_pixels = 64_000_000  # decompression-bomb guard for encoded sources
  c.data.limit_per_split = 0  # 0 = all; >0 keeps the first N of each split (smoke tests)
  # >0: a stratified subset of the train split, N images of every class, drawn with
  # data.split_seed (few-shot and data-efficiency runs); val and test are untouched. A class with
  # fewer than N train images is an error that names it.
  c.data.limit_per_class = 0
  c.data.cache_dir = ""  # downloaded sources kept here; "" = $JAXCLF_CACHE, else ~/.cache/jaxclf
  c.data.sampler = "shuffle"  # 'shuffle' | 'balanced' (class-balanced sampling with replacement)
  c.data.read_threads = 2  # Grain read threads; 0 = in the training thread
  c.data.prefetch_batches = 8  # Grain batches prepared ahead of the training step
  c.data.worker_processes = 0  # Grain mp_prefetch workers; threads beat processes on 2 cores
  # 'auto': datasets whose decoded pixels are in memory at the model's input size (Fashion-MNIST,
  # small folders) are batched by index and augmented inside the jitted step
  # (jaxclf/data/device_augment.py); others stream through Grain with per-example host transforms.
  c.data.on_device = "auto"  # auto | true | false

  c.preprocessing = ml_collections.ConfigDict()
  c.preprocessing.image_size = 28  # model input side in px (resized to it; serving does the same)
  c.preprocessing.mean = (0.2860,)  # per-channel mean on the 0-1 scale, subtracted before the model
  c.preprocessing.std = (0.3530,)  # per-channel std on the 0-1 scale, divided after the mean
  c.preprocessing.resize = "bilinear"  # the resampling filter of every resize
  # Eval: resize the shorter side to image_size / crop_fraction, then centre-crop image_size.
  c.preprocessing.crop_fraction = 1.0

  # Training-only augmentation, the same spec on the device and in Grain. timm's fine-tuning
  # families (docs/augmentation.md: each op's magnitude scale, the soft targets) are off by
  # default; timm's `--aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0 --reprob 0.25` is
  # auto=randaugment (its defaults), mixup=0.8, cutmix=1.0, random_erasing=0.25.
  c.augment = ml_collections.ConfigDict()
  c.augment.translate = 2  # max px of random shift (edge padding, random crop back); 0 = off
  c.augment.random_resized_crop = False  # Inception-style crop of crop_scale of the area, resized
  c.augment.crop_scale = (0.35, 1.0)  # random_resized_crop: the range of the kept area fraction
  c.augment.hflip = True  # random left-right flips
  # hflip's draw: 'random' = a fair coin per example and epoch | 'alternate' = airbench's
  # derandomised flip: a seeded coin in the first epoch, then the opposite of the previous epoch
  c.augment.hflip_mode = "random"
  c.augment.vflip = False  # random up-down flips
  c.augment.rotation = 0.0  # max degrees of random rotation either way; 0 = off
  c.augment.brightness = 0.0  # pixels times a factor in 1 +- x; 0 = off
  c.augment.contrast = 0.0  # distance from the mean times a factor in 1 +- x; 0 = off
  c.augment.saturation = 0.0  # RGB only: distance from grey times a factor in 1 +- x; 0 = off
  # '' (off) | randaugment | trivialaugment: the same ops per example on both input paths
  c.augment.auto = ""
  # The ops RandAugment/TrivialAugment draw from (docs/augmentation.md: each op's magnitude scale)
  c.augment.auto_ops = ("identity", "auto_contrast", "equalize", "rotate", "solarize", "color",
                        "posterize", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
                        "translate_x", "translate_y")
  c.augment.auto_num_ops = 2  # randaugment: ops drawn per image, with replacement (timm's n)
  # Magnitude on timm's 0..10 scale (its m); trivialaugment draws uniformly in [0, this].
  c.augment.auto_magnitude = 9.0
  # randaugment: std of Gaussian noise on each op's magnitude (timm's mstd); > 100 = uniform in
  # [0, auto_magnitude]
  c.augment.auto_magnitude_std = 0.5
  c.augment.auto_prob = 0.5  # randaugment: probability that each drawn op applies (timm: 0.5)
  c.augment.auto_increasing = True  # timm's inc1: every op grows more severe with the magnitude
  c.augment.random_erasing = 0.0  # chance of erasing a box per image (timm's --reprob); 0 = off
  c.augment.erasing_area = (0.02, 1 / 3)  # random_erasing: range of the erased fraction of the area
  c.augment.erasing_ratio = (0.3, 1 / 0.3)  # random_erasing: box aspect ratio range (log-uniform)
  # random_erasing fill, on the normalised image: 'pixel' = N(0, 1) per pixel (timm's --remode
  # pixel), 'const' = 0 (the mean colour)
  c.augment.erasing_mode = "pixel"
  c.augment.mixup = 0.0  # Mixup's Beta(alpha, alpha) (timm's --mixup, e.g. 0.8); 0 = off
  c.augment.cutmix = 0.0  # CutMix's Beta(alpha, alpha) (timm's --cutmix, e.g. 1.0); 0 = off
  c.augment.mix_prob = 1.0  # probability that a batch (or example, mix_mode elem) is mixed
  c.augment.mix_switch_prob = 0.5  # mixup and cutmix both on: probability of CutMix per draw
  # 'batch': one lambda (and box) per batch | 'elem': one per example (timm's --mixup-mode)
  c.augment.mix_mode = "batch"

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"  # a name from the model registry (jaxclf/models/registry.py)
  # The CNN's training levers (cnn, cnn_tiny: jaxclf/models/cnn.py), each off by default:
  #   bn_scale: 'learned' | 'frozen' (every BatchNorm scale stays 1; only the shifts train)
  #   conv_init: 'default' | 'dirac' (3x3 convs after the stem start as identity on their first
  #     min(c_in, c_out) output channels; the rest use weight_init)
  #   head_scale: logits multiplied by this constant (1.0 = none; airbench uses 1/9)
  #   stem: 'conv' | 'whiten' (a frozen k x k patch-whitening conv, fitted on the first 5,000
  #     training images at a fresh start, + ReLU before the conv layers)
  #   whiten_kernel: the whitening patch side k (2 or 3; 2*k*k*channels filters)
  #   whiten_eps: added to each patch-covariance eigenvalue before the 1/sqrt scaling (5e-4)
  c.model.kwargs = ml_collections.ConfigDict()  # passed to the model constructor
  # '' | 'imagenet' (models that ship weights) | a `jaxclf weights convert` .npz | a run dir
  c.model.pretrained = ""
  # sha256 of the model.pretrained file: a mismatch stops the run before any compute; without a
  # pin the file's hash is logged and recorded in run.json (model.pretrained_provenance).
  c.model.pretrained_sha256 = ""
  # Compute dtype of activations: float32 | bfloat16 | float16. Params, optimizer state and
  # BatchNorm statistics stay float32; float16 adds a dynamic loss scale (jaxclf/train/precision.py).
  c.model.dtype = "float32"
  # Gradient path of the convolutions (jaxclf/models/layers.py): auto = oneDNN on CPU when built,
  # else pure-JAX tap matmuls; XLA's own on GPU. Same maths and parameters either way.
  c.model.conv_impl = "auto"  # auto | xla | matmul | onednn

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # sgd | adam | adamw
  c.optimizer.learning_rate = 0.2  # peak learning rate of the schedule
  c.optimizer.momentum = 0.9  # sgd: momentum coefficient (0 = plain SGD)
  c.optimizer.nesterov = True  # sgd: Nesterov momentum
  c.optimizer.b1 = 0.9  # adam/adamw: decay of the first-moment estimate
  c.optimizer.b2 = 0.999  # adam/adamw: decay of the second-moment estimate
  c.optimizer.eps = 1e-8  # adam/adamw: added to the denominator for stability
  c.optimizer.weight_decay = 5e-4  # decoupled for adamw, L2 on kernels otherwise; never on BN/bias
  c.optimizer.grad_clip_norm = 0.0  # 0 = off
  # Learning rate of every 1-d parameter (biases, BatchNorm scales and shifts) times this
  c.optimizer.bias_lr_mult = 1.0
  # Fine-tuning: learning-rate multipliers per param group (jaxclf/models/param_groups.py: head =
  # the classifier, backbone = the rest), e.g. "backbone=0.1"; "" = one group.
  c.optimizer.lr_mults = ""
  # Layer-wise learning-rate decay (ResNet, EfficientNet): a block k levels below the head
  # trains at lr * layer_decay**k; 0 = off.
  c.optimizer.layer_decay = 0.0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "one_cycle"  # constant | step | exponential | warmup_cosine | one_cycle | plateau
  c.schedule.warmup_fraction = 0.25  # share of all steps (warmup_cosine, one_cycle)
  c.schedule.final_fraction = 0.0  # end lr / peak lr
  c.schedule.anneal = "linear"  # one_cycle: linear | cos (half-cosines, as PyTorch's OneCycleLR)
  c.schedule.step_epochs = (30, 60)  # step: multiply by decay_rate at these epochs
  c.schedule.decay_rate = 0.1  # step / exponential (per epoch)
  c.schedule.plateau_patience = 2  # plateau: epochs without val improvement before cutting lr
  c.schedule.plateau_factor = 0.5  # plateau: the lr is multiplied by this at each cut

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # global batch (all devices and processes together)
  c.train.num_epochs = 10  # passes over the train split
  c.train.label_smoothing = 0.1  # mass moved from the true class to all classes in the loss
  c.train.class_weights = "none"  # none | balanced
  c.train.keep_checkpoints = 2  # latest N (the best-by-val one is kept separately)
  c.train.eval_batch_size = 1000  # batch of the evaluators (no gradients: can be larger)
  # Also report the flip-TTA test accuracy, as metrics.test_tta (switches evals.test_tta). Off:
  # the served model is single view, so the headline figures are too; TTA doubles inference cost.
  c.train.tta_flip = False
  # Fit a softmax temperature on the validation split after training (switches
  # evals.calibration); stored in the run and the preprocessing spec and baked into the export,
  # so served confidences are calibrated.
  c.train.calibrate = True
  c.train.max_steps = 0  # 0 = num_epochs worth; >0 stops early (smoke tests, resume tests)
  c.train.progress_bar = True  # a progress line on stderr (process 0 only)
  # K >= 1: each step splits its batch into K micro-batches inside the jitted step and applies
  # their mean gradient once (the update of one K x larger batch at one micro-batch's memory);
  # train.batch_size must be divisible by K x the global device count.
  c.train.grad_accum_steps = 1
  # Fine-tuning: the first K epochs train the head alone, with the backbone in inference mode
  # (BatchNorm running statistics, no stochastic depth, no dropout) and its weights exactly
  # frozen; then everything trains (optimizer.lr_mults sets the backbone's rate). Resumes by step.
  c.train.freeze_backbone_epochs = 0
  # While the backbone is frozen, compute its features once per train image and train the head
  # on that cache (a linear probe): frozen epochs then cost a few matrix products. The cached
  # features are of the UN-augmented image (eval preprocessing); augmentation applies only after
  # unfreezing. Needs a model whose head is one Dense layer.
  c.train.cache_frozen_features = False
  # The forward pass stays in inference mode for the whole run: BatchNorm normalises with and
  # keeps its (pretrained) running statistics; dropout and stochastic depth, tied to the same
  # flag, are off. For fine-tuning on little data, where a small batch's statistics differ from
  # the weights' own and switching to them at unfreezing wrecks the features (Keras's advice).
  c.train.freeze_batchnorm = False
  c.train.ema = ml_collections.ConfigDict()  # weight averaging (jaxclf/train/ema.py)
  # Weight averaging: an exponential moving average of the params and BatchNorm statistics,
  # updated inside the train step and saved in the checkpoints. When on, every evaluation
  # (checkpoint selection, test, calibration), `jaxclf evaluate`, the export and so the registry
  # and the served model use the average; run.json `weights` says "ema". The factor per training
  # step, in [0, 1): ema = d * ema + (1 - d) * weights, an average over about 1 / (1 - decay)
  # steps (0.999: 1000). 0 = off: the trained weights are used.
  c.train.ema.decay = 0.0
  # Ramp d_t = min(decay, (1 + t) / (10 + t)) at step t, so that early steps count while the
  # average is young (a short run is not mostly its initial weights); false: decay throughout.
  c.train.ema.warmup = True
  # Update every K steps, by decay**K each time (decay stays per step, so K trades the update's
  # cost against a coarser average, not its horizon).
  c.train.ema.every = 1

  # When the loop's periodic actions fire (jaxclf/train/actions.py), one rule for all
  # (jaxclf/config/periodic.py, big_vision's u.steps/u.itstime): "<N> steps", "<N> epochs",
  # "<N>%" of training, or "" (never). log and checkpoint also fire on the last step;
  # image_summary also on the first step of each run segment (a fresh start or a resume).
  c.periodic = ml_collections.ConfigDict()
  c.periodic.log = "50 steps"  # train/* scalars, the progress bar, run.json last_train
  c.periodic.checkpoint = "200 steps"  # checkpoints/latest (best is saved when val improves)
  c.periodic.image_summary = ""  # the augmented batch as a TensorBoard image grid
  c.periodic.early_stopping = "1 epochs"  # a patience check (early_stopping.patience of them)
  c.periodic.plateau = "1 epochs"  # schedule.name=plateau: a reduce-on-plateau check
  c.periodic.confusion_matrix = ""  # e.g. "2 epochs": val confusion matrix image (one val pass)

  # Evaluators, run by name (jaxclf/train/evaluators.py; big_vision's config.evals): `type`
  # (classification | calibration), `when` (a periodic rule, or "end": once after training on the
  # best-by-validation checkpoint), and the type's own fields. The entry named by
  # early_stopping.metric ("val") selects the best checkpoint and writes run.json's history.
  c.evals = ml_collections.ConfigDict()
  # The validation pass each epoch: selects the best checkpoint, feeds early stopping and sweeps.
  c.evals.val = ml_collections.ConfigDict(
      {"type": "classification", "split": "val", "when": "1 epochs", "tta_flip": False,
       "enabled": True})
  # The test split once at the end, single view: the headline figures (the served model's).
  c.evals.test = ml_collections.ConfigDict(
      {"type": "classification", "split": "test", "when": "end", "tta_flip": False,
       "enabled": True})
  # The flip-TTA test accuracy (metrics.test_tta), on when train.tta_flip is.
  c.evals.test_tta = ml_collections.ConfigDict(
      {"type": "classification", "split": "test", "when": "end", "tta_flip": True,
       "enabled": c.train.get_ref("tta_flip")})
  # Temperature scaling fitted on val, ECE reported on test; on when train.calibrate is.
  c.evals.calibration = ml_collections.ConfigDict(
      {"type": "calibration", "split": "val", "report_split": "test", "when": "end",
       "enabled": c.train.get_ref("calibrate")})

  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = "val_accuracy"  # val_accuracy | val_loss
  c.early_stopping.patience = 0  # epochs; 0 = off
  c.early_stopping.min_delta = 0.0  # the least change of the metric that counts as an improvement

  # Multi-process training on jax.distributed (jaxclf/train/distributed.py). Every process runs
  # the same command; only process_id differs. Env: JAXCLF_DISTRIBUTED__COORDINATOR=... (the JobSet).
  c.distributed = ml_collections.ConfigDict()
  # "" = one process; "host:port" = process 0's coordinator; "auto" = jax.distributed's own
  # cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes with jax[k8s]).
  c.distributed.coordinator = ""
  c.distributed.num_processes = 1  # how many processes join; the mesh spans all their devices
  c.distributed.process_id = 0  # this process, 0 .. num_processes-1 (0 hosts the coordinator)
  c.distributed.init_timeout_s = 300  # every process waits this long for all of them to join
  c.distributed.heartbeat_timeout_s = 60  # a lost process ends the whole job within this bound

  # Experiment tracking beyond run.json + TensorBoard (jaxclf/tracking/mlflow_bridge.py).
  c.tracking = ml_collections.ConfigDict()
  c.tracking.mlflow_uri = ""  # e.g. http://127.0.0.1:5000; "" = MLFLOW_TRACKING_URI, else off
  c.tracking.mlflow_experiment = ""  # "" = the config's name
  return c
