"""The PyTorch anchor of shared/design/FINDINGS.md ("Fashion-MNIST in 10 minutes"), as one
process. Run by bench/race.py; also usable alone:

  .venv/bin/python bench/torch_anchor.py --seed 0 [--epochs 10] > anchor.jsonl

Recipe (RECIPE below, stored with every result): VGG-style CNN 32-32-M-64-64-M-128-M
(bench/torch_models.py::CNN, 150,698 params, dropout 0.2), channels_last, 2 threads, batch 256,
SGD-Nesterov momentum 0.9, weight decay 5e-4 on conv/linear weights only (none on BN or biases),
OneCycleLR (max_lr 0.2, pct_start 0.25, stepped per batch, momentum held at 0.9), label smoothing
0.1, data held in memory as tensors, per batch a +-2 px random translate (one gather from a
pre-padded tensor) plus a random horizontal flip, normalised with mean 0.2860 / std 0.3530.

Data and split are jaxclf's own: the IDX files come through jaxclf.data.sources.fashion_mnist
(Debian's /usr/share/datasets/fashion-mnist/, sha256-checked) and validation is carved with
jaxclf.data.splits.carve_validation(labels, val_fraction, split_seed), exactly the call of
fashion_mnist.load, so both sides train on the same 54k images and validate on the same 6k.
Those modules are numpy-only; this script asserts that jax never gets imported.

Output: JSON lines on stdout. {"event": "start"|"epoch"|"test", "t": unix time, ...} as they
happen (the parent turns the "t" into elapsed time since it started this process), then one
{"event": "result", ...} line. The "test" line is printed right after the final model's test
accuracy is known: that is where this side's wall time ends. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

T_IMPORT = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch_models  # noqa: E402
from row_hash import rows_sha256  # noqa: E402  (numpy-only)
from jaxclf.data.sources import fashion_mnist  # noqa: E402  (numpy-only)
from jaxclf.data.splits import carve_validation  # noqa: E402  (numpy-only)

assert "jax" not in sys.modules, "bench/torch_anchor.py must not import jax (via jaxclf.data?)"

RECIPE = {
    "model": "bench/torch_models.py::CNN(layers=(32, 32, 'M', 64, 64, 'M', 128, 'M'), dropout=0.2)",
    "params": 150_698,
    "memory_format": "channels_last",
    "threads": 2,
    "batch_size": 256,
    "drop_last": True,
    "optimizer": "SGD(nesterov=True, momentum=0.9)",
    "weight_decay": 5e-4,
    "weight_decay_on": "conv and linear weights (ndim > 1); none on BN or biases",
    "schedule": "OneCycleLR(max_lr=0.2, pct_start=0.25, anneal_strategy='cos', div_factor=25, "
                "final_div_factor=1e4, cycle_momentum=False), stepped per batch",
    "max_lr": 0.2,
    "pct_start": 0.25,
    "label_smoothing": 0.1,
    "augment": "per image: random translate in [-2, 2] px (zero-padded, one gather from a "
               "pre-padded tensor) + random horizontal flip (p=0.5)",
    "normalize": {"mean": 0.2860, "std": 0.3530},
    "data": "jaxclf.data.sources.fashion_mnist.load_arrays + "
            "jaxclf.data.splits.carve_validation(train_labels, val_fraction, split_seed)",
    "eval": "single view, eval mode, every epoch on val; test on the final model",
    "seeding": "torch.manual_seed(seed), np.random.seed(seed)",
}
MEAN, STD = 0.2860, 0.3530
PAD = 2


def emit(event: str, **kw) -> None:
  print(json.dumps({"event": event, "t": time.time(), **kw}), flush=True)


def log(msg: str) -> None:
  print(f"[torch_anchor] {msg}", file=sys.stderr, flush=True)


def _index_sha(idx: np.ndarray) -> str:
  return hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()


def load_data(val_fraction: float, split_seed: int):
  arrays = fashion_mnist.load_arrays(None)
  x, y = arrays["train"]
  tr_idx, va_idx = carve_validation(y, float(val_fraction), int(split_seed))

  def tensors(images, labels):
    t = torch.from_numpy(np.array(images[..., 0], copy=True)).float().div_(255.0)
    t = (t - MEAN) / STD
    return t.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))  # (N, 1, 28, 28)

  rows = {"train": (x[tr_idx], y[tr_idx]), "val": (x[va_idx], y[va_idx]), "test": arrays["test"]}
  split = {k: tensors(*v) for k, v in rows.items()}
  # The rows the tensors above were made from (bench/row_hash.py): bench/race.py compares them
  # with the rows jaxclf's training loop was handed, and takes the hashing's seconds off the
  # wall time.
  t_hash = time.time()
  rows_sha = {k: rows_sha256(*v) for k, v in rows.items()}
  info = {"val_fraction": float(val_fraction), "split_seed": int(split_seed),
          "counts": {k: int(v[1].numel()) for k, v in split.items()},
          "train_index_sha256": _index_sha(tr_idx), "val_index_sha256": _index_sha(va_idx),
          "rows_sha256": rows_sha, "rows_hash_s": time.time() - t_hash}
  return split, info


class Augmenter:
  """+-PAD px translate and horizontal flip for a whole batch as one gather from a padded copy."""

  def __init__(self, images: torch.Tensor, generator: torch.Generator):
    n, _, h, w = images.shape
    pad_value = (0.0 - MEAN) / STD  # black, normalised
    self.padded = torch.nn.functional.pad(images[:, 0], (PAD, PAD, PAD, PAD), value=pad_value)
    self.h, self.w, self.g = h, w, generator
    self.ar_h = torch.arange(h)
    self.ar_w = torch.arange(w)

  def __call__(self, idx: torch.Tensor) -> torch.Tensor:
    b = idx.numel()
    oy = torch.randint(0, 2 * PAD + 1, (b, 1), generator=self.g)
    ox = torch.randint(0, 2 * PAD + 1, (b, 1), generator=self.g)
    flip = torch.rand(b, 1, generator=self.g) < 0.5
    rows = oy + self.ar_h  # (B, H)
    cols = ox + torch.where(flip, self.w - 1 - self.ar_w, self.ar_w)  # (B, W)
    ph, pw = self.padded.shape[1:]
    flat = idx[:, None, None] * (ph * pw) + rows[:, :, None] * pw + cols[:, None, :]  # (B, H, W)
    out = torch.take(self.padded, flat)  # one gather (faster here than 3-tensor indexing)
    return out.unsqueeze(1).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> dict:
  model.eval()
  correct, loss_sum = 0, 0.0
  ce = nn.CrossEntropyLoss(reduction="sum")
  for i in range(0, len(y), bs):
    xb = x[i:i + bs].contiguous(memory_format=torch.channels_last)
    logits = model(xb)
    loss_sum += float(ce(logits, y[i:i + bs]))
    correct += int((logits.argmax(1) == y[i:i + bs]).sum())
  model.train()
  return {"accuracy": correct / len(y), "loss": loss_sum / len(y), "count": int(len(y))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--max-lr", type=float, default=0.2)
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--split-seed", type=int, default=0)
  a = p.parse_args()

  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  np.random.seed(a.seed)
  emit("start", import_s=time.time() - T_IMPORT)

  data, data_info = load_data(a.val_fraction, a.split_seed)
  xtr, ytr = data["train"]
  gen = torch.Generator().manual_seed(a.seed)
  aug = Augmenter(xtr, gen)
  log(f"data: {data_info['counts']}")

  model = torch_models.CNN(dropout=0.2).to(memory_format=torch.channels_last)
  n_params = sum(p.numel() for p in model.parameters())
  assert n_params == RECIPE["params"], n_params
  decay = [q for q in model.parameters() if q.ndim > 1]
  no_decay = [q for q in model.parameters() if q.ndim <= 1]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                         {"params": no_decay, "weight_decay": 0.0}],
                        lr=a.max_lr, momentum=0.9, nesterov=True)
  n = len(ytr)
  steps_per_epoch = n // a.batch_size
  total_steps = steps_per_epoch * a.epochs
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.max_lr, total_steps=total_steps,
                                              pct_start=0.25, cycle_momentum=False)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

  curve, train_s = [], 0.0
  model.train()
  for epoch in range(1, a.epochs + 1):
    t0 = time.time()
    perm = torch.randperm(n, generator=gen)
    loss_sum = torch.zeros(())
    for s in range(steps_per_epoch):
      idx = perm[s * a.batch_size:(s + 1) * a.batch_size]
      xb, yb = aug(idx), ytr[idx]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(xb), yb)
      loss.backward()
      opt.step()
      sched.step()
      loss_sum += loss.detach()
    dt = time.time() - t0
    train_s += dt
    val = evaluate(model, *data["val"])
    row = {"epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"],
           "train_loss": float(loss_sum) / steps_per_epoch, "train_s": dt,
           "images_per_s": steps_per_epoch * a.batch_size / dt}
    curve.append(row)
    emit("epoch", **row)
    log(f"epoch {epoch}/{a.epochs}: val {val['accuracy']:.4f} loss {val['loss']:.4f} "
        f"({row['images_per_s']:.0f} img/s)")

  test = evaluate(model, *data["test"])
  emit("test", accuracy=test["accuracy"], loss=test["loss"])
  log(f"test accuracy {test['accuracy']:.4f}")
  emit("result", seed=a.seed, epochs=a.epochs, steps=total_steps, params=n_params,
       test=test, curve=curve, train_s=train_s,
       train_images_per_s=total_steps * a.batch_size / train_s if train_s else None,
       data=data_info, torch=torch.__version__, threads=torch.get_num_threads(),
       recipe={**RECIPE, "batch_size": a.batch_size, "threads": a.threads, "max_lr": a.max_lr,
               "epochs": a.epochs},
       jax_imported="jax" in sys.modules)


if __name__ == "__main__":
  main()
