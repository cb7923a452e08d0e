"""The data-efficiency curve: does Lite0's ImageNet pretraining pay off on little Fashion-MNIST?

  .venv/bin/python bench/transfer_curve.py --out docs/transfer_curve            # the full curve
  .venv/bin/python bench/transfer_curve.py --smoke --out /tmp/curve_smoke       # minutes: wiring

Arms, at each training-set size (stratified: data.limit_per_class = size / 10):
  pretrained  configs/transfer.py:full's recipe: Lite0 + ImageNet weights, 2 frozen epochs on
              cached features, then everything with the backbone at 0.1x and BatchNorm on its
              ImageNet statistics; lr 0.01 at batch 128
  scratch     the same architecture, input, epochs, optimizer and augmentation, random init, at
              the optimizer's from-scratch lr 0.05 (no frozen phase, no frozen BatchNorm: there
              is nothing to keep)
  cnn         the anchor CNN (configs/cnn.py:anchor: the default's net and recipe without its
              training levers) from scratch at its own 28 px, same epochs
Sizes 100, 500, 2,000; seeds 0 and 1 at 100 and 500 (a seed sets both the init and which
images are drawn, so the spread includes the sample), seed 0 at 2,000.

Every point is evaluated single view on ONE fixed stratified 2,000-image subset of the test set
(200 per class, drawn once with seed 12345), with a 95% bootstrap CI (1,000 resamples); the best
pretrained 2,000-image model is also evaluated on the full 10,000 (--headline). Model selection
is the run's own best-by-validation checkpoint on 600 validation images (data.val_fraction=0.01),
never the test subset. Writes <out>.json (every run: accuracy, CI, train wall time, overrides)
and <out>.png.

The budget: 64 px, 12 epochs. Lite0 downsamples 32x, so 64 px is the smallest size with a 2x2
final map, at (64/224)^2 = 8% of the native cost. Image-steps of the Lite0 arms: pretrained
(100+100+500+500+2000) x 10 unfrozen epochs = 32,000 (the 2 frozen epochs are one cached forward
per image), scratch x 12 = 38,400; `bench/lite0_step.py` measures the step rate that turns this
into minutes on a given machine. The committed run's wall time is docs/transfer_curve.json's
`wall_s` plus the `train_wall_s` of its reused points.

--reuse DIR evaluates a point from DIR/<arm>_<size>_s<seed> instead of training it when that run
finished with exactly the point's config. The point then records `reused: true`, `run_dir` (the
reused directory), `git` and `trained_at` from that run's run.json, and `train_wall_s` = its
`duration_s`; `reused_points` counts them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import emit, scrub_paths  # noqa: E402

TEST_SEED = 12345
ARMS = ("pretrained", "scratch", "cnn")


def arm_config(arm: str, per_class: int, seed: int, epochs: int, size: int, smoke: bool):
  from jaxclf.config import load_config
  common = [f"data.limit_per_class={per_class}", f"seed={seed}", f"data.split_seed={seed}",
            f"train.num_epochs={epochs}", "data.val_fraction=0.01", "train.calibrate=false",
            "evals.test.enabled=false", "train.progress_bar=false", "periodic.log=1 epochs",
            "periodic.checkpoint=100%", "evals.val.when=2 epochs"]
  batch = max(8, min(64, per_class * 10 // 8))  # >= 8 steps per epoch at 100 images
  if arm == "cnn":
    path, over = f"{ROOT}/configs/cnn.py:anchor", list(common)
  else:
    path = f"{ROOT}/configs/transfer.py:full"
    over = [*common, f"preprocessing.image_size={size}", f"augment.translate={max(1, size // 16)}"]
    if arm == "scratch":
      # Everything of the fine-tuning recipe that needs pretrained weights goes, and the rate is
      # the optimizer's from-scratch 0.05 (fine-tuning's 0.01 is deliberately lower).
      over += ["model.pretrained=", "train.freeze_backbone_epochs=0",
               "train.cache_frozen_features=false", "optimizer.lr_mults=",
               "train.freeze_batchnorm=false", "optimizer.learning_rate=0.05"]
    elif smoke:
      over += ["train.freeze_backbone_epochs=1"]
  c = load_config(path, environ={}, overrides=over)
  # The configs' peak rates are for their own batch: scale linearly to this one (the smoke run's
  # CNN at batch 8 diverged with batch 256's 0.2).
  c.optimizer.learning_rate *= batch / int(c.train.batch_size)
  c.train.batch_size = batch
  return c


def test_subset(n_per_class: int):
  """The fixed stratified test subset: (uint8 images, labels, indices into the 10k)."""
  from jaxclf.data.dataset import stratified_indices
  from jaxclf.data.sources.fashion_mnist import load_arrays
  x, y = load_arrays(None)["test"]
  idx = stratified_indices(y, 10, n_per_class, TEST_SEED)
  return x[idx], y[idx], idx


def evaluate(run_dir: str, x: np.ndarray, y: np.ndarray, boot: int = 1000) -> dict:
  """Single-view accuracy of the run's best checkpoint, with a 95% bootstrap CI."""
  from jaxclf.data.transforms import preprocess_batch
  from jaxclf.train.checkpoints import load_inference
  inf = load_inference(run_dir, "best")
  logits = np.concatenate([inf.raw_logits(preprocess_batch(list(x[i:i + 250]), inf.spec))
                           for i in range(0, len(y), 250)])
  correct = (logits.argmax(-1) == y).astype(np.float64)
  rng = np.random.default_rng(0)
  means = correct[rng.integers(0, len(y), (boot, len(y)))].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"accuracy": round(float(correct.mean()), 4), "ci95": [round(float(lo), 4),
                                                                round(float(hi), 4)],
          "n": int(len(y)), "step": int(inf.step)}


def summarise(points: list[dict]) -> dict:
  """Per (arm, size): mean and seed spread; per size: pretrained minus scratch against the
  spreads (the must-show: the margin is larger than the seed spread)."""
  table: dict = {}
  for p in points:
    table.setdefault(p["arm"], {}).setdefault(str(p["size"]), []).append(p["test"]["accuracy"])
  out = {arm: {size: {"mean": round(float(np.mean(v)), 4),
                      "spread": round(float(np.max(v) - np.min(v)), 4), "seeds": len(v)}
               for size, v in sizes.items()} for arm, sizes in table.items()}
  margins = {}
  for size in out.get("pretrained", {}):
    if size in out.get("scratch", {}):
      pre, scr = out["pretrained"][size], out["scratch"][size]
      m = pre["mean"] - scr["mean"]
      # One seed has no spread to beat: None, not a vacuous True.
      beats = bool(m > max(pre["spread"], scr["spread"])) \
          if min(pre["seeds"], scr["seeds"]) > 1 else None
      margins[size] = {"margin": round(m, 4), "larger_than_spread": beats}
  return {"by_arm": out, "pretrained_minus_scratch": margins}


def plot(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, colour in zip(ARMS, ("C0", "C3", "C2")):
    ps = sorted((p for p in points if p["arm"] == arm), key=lambda p: p["size"])
    if not ps:
      continue
    xs = np.array([p["size"] for p in ps]) * (1 + 0.03 * (ARMS.index(arm) - 1))
    acc = np.array([p["test"]["accuracy"] for p in ps])
    lo = acc - np.array([p["test"]["ci95"][0] for p in ps])
    hi = np.array([p["test"]["ci95"][1] for p in ps]) - acc
    ax.errorbar(xs, acc, yerr=[lo, hi], fmt="o", color=colour, label=arm, capsize=3)
    sizes = sorted({p["size"] for p in ps})
    ax.plot(sizes, [np.mean([p["test"]["accuracy"] for p in ps if p["size"] == s])
                    for s in sizes], "-", color=colour, alpha=0.6)
  ax.set_xscale("log")
  ax.set_xlabel("training images (stratified)")
  n = points[0]["test"]["n"] if points else 0
  ax.set_ylabel(f"test accuracy ({n:,}-image stratified subset, 95% CI)")
  ax.set_title("Fashion-MNIST: Lite0 pretrained vs scratch vs default CNN")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def reusable_run(reuse_dir: str, name: str, config) -> str:
  """reuse_dir/name when the run there finished with exactly `config`, else "". config.json is
  compared key by key; a key that is new since that run counts as the same when it is at its
  default (it did not exist, so the run had the default behaviour)."""
  from flax.traverse_util import flatten_dict
  from jaxclf.config import default_config
  run_dir = os.path.join(reuse_dir, name) if reuse_dir else ""
  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      saved = json.load(f)
    with open(os.path.join(run_dir, "run.json")) as f:
      status = json.load(f).get("status")
  except (OSError, ValueError):
    return ""
  now, defaults = (flatten_dict(json.loads(json.dumps(c.to_dict(), default=list)), sep=".")
                   for c in (config, default_config()))
  then = flatten_dict(saved, sep=".")
  same = all(then[k] == v if k in then else v == defaults.get(k) for k, v in now.items())
  return run_dir if same and set(then) <= set(now) and status == "completed" else ""


def repo_relative(path: str) -> str:
  """`path` relative to the checkout when it lies inside it."""
  return scrub_paths(os.path.abspath(path), {ROOT + os.sep: ""})


def plan(smoke: bool, arms, sizes) -> list[tuple[str, int, int]]:
  runs = []
  for size in sizes:
    for seed in ((0,) if smoke or size > 500 else (0, 1)):
      runs += [(arm, size, seed) for arm in arms]
  return runs


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="docs/transfer_curve", help="writes OUT.json and OUT.png")
  p.add_argument("--workdir", default="runs/transfer_curve")
  p.add_argument("--sizes", default="100,500,2000")
  p.add_argument("--arms", default=",".join(ARMS))
  p.add_argument("--epochs", type=int, default=12)
  p.add_argument("--size", type=int, default=64, help="Lite0 input px")
  p.add_argument("--test-per-class", type=int, default=200)
  p.add_argument("--headline", action="store_true",
                 help="also evaluate the pretrained 2,000-image model on the full 10k test set")
  p.add_argument("--reuse", default="",
                 help="a previous --workdir: a point whose run there finished with exactly this "
                      "point's config is evaluated from it, not trained again")
  p.add_argument("--smoke", action="store_true",
                 help="wiring check: 20 images, 1 seed, 2 epochs at 32 px, 100 test images")
  a = p.parse_args()
  if a.smoke:
    a.sizes, a.epochs, a.size, a.test_per_class = "20", 2, 32, 10
  from jaxclf.train.loop import train_and_evaluate
  x, y, _ = test_subset(a.test_per_class)
  points, t_all = [], time.time()
  for arm, size, seed in plan(a.smoke, a.arms.split(","), [int(s) for s in a.sizes.split(",")]):
    config = arm_config(arm, size // 10, seed, a.epochs, a.size, a.smoke)
    run_dir = os.path.join(a.workdir, f"{arm}_{size}_s{seed}")
    reused = reusable_run(a.reuse, os.path.basename(run_dir), config)
    if reused:
      run_dir = reused
      with open(os.path.join(run_dir, "run.json")) as f:
        record = json.load(f)
      train_s = record["duration_s"]
    else:
      t0 = time.time()
      record = train_and_evaluate(config, run_dir)
      train_s = time.time() - t0
    point = {"arm": arm, "size": size, "seed": seed, "run_dir": repo_relative(run_dir),
             "reused": bool(reused),
             "train_wall_s": round(train_s, 1), "model": config.model.name,
             "image_size": int(config.preprocessing.image_size),
             "epochs": int(config.train.num_epochs), "batch": int(config.train.batch_size),
             "frozen_epochs": int(config.train.freeze_backbone_epochs),
             "feature_cache": record.get("feature_cache"), "test": evaluate(run_dir, x, y),
             "git": record.get("git"), "trained_at": record.get("start")}
    if a.headline and arm == "pretrained" and size == max(int(s) for s in a.sizes.split(",")):
      from jaxclf.data.sources.fashion_mnist import load_arrays
      fx, fy = load_arrays(None)["test"]
      point["test_full_10k"] = evaluate(run_dir, fx, fy)
    print(json.dumps(point), flush=True)
    points.append(point)
  result = {"command": " ".join(sys.argv), "host_cpus": os.cpu_count(),
            "wall_s": round(time.time() - t_all, 1), "test_subset": {
                "per_class": a.test_per_class, "seed": TEST_SEED, "images": int(len(y))},
            "reused_points": sum(p["reused"] for p in points),
            "points": points, "summary": summarise(points)}
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  plot(points, a.out + ".png")
  emit(result, a.out + ".json")


if __name__ == "__main__":
  main()
