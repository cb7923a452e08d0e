"""The default recipe's levers, one arm at a time and stacked, over seeds; selected on val only.

  .venv/bin/python bench/recipe.py --arms base,ema --seeds 0,1,2,3,4
  .venv/bin/python bench/recipe.py --arms base,epochs15,epochs20 --seeds 0,1,2,3,4
  .venv/bin/python bench/recipe.py --list                      # the arms and their overrides
  .venv/bin/python bench/recipe.py --suite transfer100 --arms all --seeds 0,1,2
  .venv/bin/python bench/recipe.py --suite photos --arms none,randaugment --seeds 0,1,2

Suites (--suite): `cnn` (the default), the training levers of configs/cnn.py below; `transfer100`,
`transfer500` and `photos`, the timm augmentation families (RandAugment, TrivialAugment,
Mixup + CutMix, Random Erasing, alone and all together) on configs/transfer.py:few_shot at 100
and 500 images and on configs/photos.py:size=128 with bench/photo_race.py's 2,500-image photo
set (built once under --data-root). Each suite writes its own docs/results/*.json.

Each (arm, seed) of the cnn suite is `jaxclf train --config configs/cnn.py:anchor --set seed=S
--set <the arm's overrides>` in a fresh process, in a fresh work folder: every arm is a change to
the PyTorch anchor's recipe (`:anchor`, which the default configs/cnn.py was before these
levers), so the table stays one experiment whatever the default becomes. The default is the arm
DEFAULT_ARM (tests/test_bench_checks.py checks that configs/cnn.py is `:anchor` plus its
overrides).

Per run it keeps the validation accuracy of the checkpoint jaxclf selected (metrics.val of
run.json: the figure arms are compared on), the wall time from process start to exit, and the
steady train images/s. The run's test figure is recorded too (`test_accuracy`, and per arm
`test_mean` in the summary) but never compared: a recipe is chosen on validation; the test figure
is what the write-up quotes for the chosen default (for configs/cnn.py, `bench/race.py` against
the PyTorch anchor gives it).

Results accumulate in --out (default: the suite's JSON): a run already there for the same
arm, seed, config and overrides is not repeated, so a long ablation can be stopped and continued, and
arms can be added later. `summary` gives per arm the val mean +- std (sample std over seeds;
accuracies as fractions, as run.json has them), the mean wall and the highest load average its
runs saw. Walls from different sittings or machines are
not comparable: compare arms whose runs were interleaved in one invocation (seeds run in the
outer loop, arms in the inner one, so background load spreads over all arms alike).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import provenance  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/cnn.py:anchor"
DEFAULT_ARM = "whiten_stack"  # configs/cnn.py as committed

# name -> the --set overrides on top of configs/cnn.py:anchor ("base": the anchor recipe itself).
ARMS: dict[str, tuple[str, ...]] = {
    "base": (),
    "epochs15": ("train.num_epochs=15",),
    "epochs20": ("train.num_epochs=20",),
    "ema": ("train.ema.decay=0.99", "train.ema.every=4"),
    "ls0.2": ("train.label_smoothing=0.2",),
    # Twice the steps per epoch at half the batch (learning rate scaled linearly with it).
    "batch128": ("train.batch_size=128", "optimizer.learning_rate=0.1"),
    "lr_floor": ("schedule.final_fraction=0.05",),
    # airbench's derandomised flip: each example flipped in exactly one of any two epochs.
    "alt_flip": ("augment.hflip_mode=alternate",),
    # Pool before the block's second conv (airbench's conv-pool-BN-ReLU, with BN after the pool):
    # the 28x28 and 14x14 second convs run at half the resolution, about half the FLOPs.
    # BatchNorm: scale frozen at 1, every 1-d parameter (BN shifts, biases) at 16x the rate.
    "bn_frozen": ("model.kwargs.bn_scale=frozen", "optimizer.bias_lr_mult=16"),
    "dirac": ("model.kwargs.conv_init=dirac",),
    "head_scale": ("model.kwargs.head_scale=0.125",),
    # A frozen 2x2 patch-whitening layer in front (8 filters: the 4 eigenvectors, +- each).
    "whiten": ("model.kwargs.stem=whiten", "model.kwargs.whiten_kernel=2"),
    # The whitening stem with the two BatchNorm/init levers that each gave ~+0.3 alone.
    "whiten_stack": ("model.kwargs.stem=whiten", "model.kwargs.whiten_kernel=2",
                     "model.kwargs.conv_init=dirac", "model.kwargs.bn_scale=frozen",
                     "optimizer.bias_lr_mult=16"),
    # The default plus the two cheap levers that gave most alone on seed 0 (alternating flips,
    # label smoothing 0.2).
    "whiten_plus": ("model.kwargs.stem=whiten", "model.kwargs.whiten_kernel=2",
                    "model.kwargs.conv_init=dirac", "model.kwargs.bn_scale=frozen",
                    "optimizer.bias_lr_mult=16", "augment.hflip_mode=alternate",
                    "train.label_smoothing=0.2"),
    # The default plus weight averaging with the rate floored at 5% (airbench's averaging).
    "whiten_ema": ("model.kwargs.stem=whiten", "model.kwargs.whiten_kernel=2",
                   "model.kwargs.conv_init=dirac", "model.kwargs.bn_scale=frozen",
                   "optimizer.bias_lr_mult=16", "train.ema.decay=0.99", "train.ema.every=4",
                   "schedule.final_fraction=0.05"),
    "pool_early": ("model.kwargs.layers=[32,M,32,64,M,64,128,M]",),
    # The same placement 1.5x wider: about the anchor's FLOPs again (24.7 M MACs against 21.9 M).
    "pool_early_wide": ("model.kwargs.layers=[48,M,48,96,M,96,192,M]",),
    # Only the first block pools early (its second conv at 14x14): about 3/4 of the FLOPs, the
    # 14x14 block keeps both convs.
    "pool_first": ("model.kwargs.layers=[32,M,32,64,64,M,128,M]",),
    # The early-pool net's saved time spent on epochs: 18 epochs at its step cost about the
    # committed recipe's 10.
    "pool_early_e18": ("model.kwargs.layers=[32,M,32,64,M,64,128,M]", "train.num_epochs=18"),
    "pool_early_stack_e18": ("model.kwargs.layers=[32,M,32,64,M,64,128,M]", "train.num_epochs=18",
                             "train.ema.decay=0.99", "train.ema.every=4",
                             "augment.hflip_mode=alternate", "train.label_smoothing=0.2"),
    # Stacked: the wider early-pool net with the levers that cost nothing at inference.
    "stack": ("model.kwargs.layers=[48,M,48,96,M,96,192,M]", "train.ema.decay=0.99",
              "train.ema.every=4", "augment.hflip_mode=alternate", "train.label_smoothing=0.2"),
}

# The timm fine-tuning families (docs/augmentation.md), each alone and all together, at timm's
# usual settings: --aa rand-m9-mstd0.5-inc1 (augment.auto's defaults), --mixup 0.8 --cutmix 1.0,
# --reprob 0.25. "none" is the config as committed.
AUGMENT_ARMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "randaugment": ("augment.auto=randaugment",),
    "trivialaugment": ("augment.auto=trivialaugment",),
    "mixup_cutmix": ("augment.mixup=0.8", "augment.cutmix=1.0"),
    "erasing": ("augment.random_erasing=0.25",),
    "all": ("augment.auto=randaugment", "augment.mixup=0.8", "augment.cutmix=1.0",
            "augment.random_erasing=0.25"),
}


def photo_data(root: str) -> tuple[list[str], dict]:
  """bench/photo_race.py's 2,500-image photo set (built and ingested once under `root`)."""
  from photo_race import prepare_data
  ds, info = prepare_data(root, 250, 0, sys.executable)
  return [f"data.source={ds}"], {k: info[k] for k in ("images", "sha256_of_files", "splits")}


@dataclasses.dataclass(frozen=True)
class Suite:
  """One experiment: a config, the arms (overrides on top of it) and where results go.
  `shared`: overrides every arm runs with (recorded per run); `data(root)`: overrides naming
  prepared data (not recorded: a path) and what to record about that data instead."""
  config: str
  arms: dict
  out: str
  shared: tuple[str, ...] = ()
  default_arm: str | None = None
  data: Callable | None = None


# 500 images: 50 per class at the batch bench/transfer_curve.py uses there (500 * 10 // 80 = 62),
# the few-shot rate scaled linearly to it (0.01 at batch 128), as transfer_curve.py does.
TRANSFER_500 = ("data.limit_per_class=50", "train.batch_size=62",
                "optimizer.learning_rate=0.00484375")
SUITES = {
    "cnn": Suite(CONFIG, ARMS, "docs/results/recipe.json", default_arm=DEFAULT_ARM),
    "transfer100": Suite("configs/transfer.py:few_shot", AUGMENT_ARMS,
                         "docs/results/augment_transfer100.json"),
    "transfer500": Suite("configs/transfer.py:few_shot", AUGMENT_ARMS,
                         "docs/results/augment_transfer500.json", shared=TRANSFER_500),
    "photos": Suite("configs/photos.py:size=128", AUGMENT_ARMS, "docs/results/augment_photos.json",
                    data=photo_data),
}


def run_one(suite: Suite, arm: str, seed: int, data_sets: list[str], keep: str | None) -> dict:
  overrides = suite.arms[arm]
  workdir = tempfile.mkdtemp(prefix=f"recipe_{arm}_s{seed}_")
  cmd = [os.path.join(os.path.dirname(sys.executable), "jaxclf"), "train", "--config",
         suite.config, "--workdir", workdir, "--set", f"seed={seed}", "--set",
         "train.progress_bar=False"]
  for o in (*data_sets, *suite.shared, *overrides):
    cmd += ["--set", o]
  load_start = os.getloadavg()[0]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.time() - t0
  # The 1-minute load average before and after: on 2 cores, a run beside other work shows
  # about 3+ and its wall is not comparable with a quiet run's (about 2: the run itself).
  rec = {"arm": arm, "seed": seed, "config": suite.config, "overrides": list(overrides),
         **({"shared": list(suite.shared)} if suite.shared else {}), "wall_s": round(wall, 1),
         "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
  try:
    with open(os.path.join(workdir, "run.json")) as f:
      run = json.load(f)
  except OSError:
    rec["error"] = f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1]
    return rec
  val = run["metrics"]["val"]
  # The test split's figure is recorded for the chosen default's write-up, never compared.
  rec.update(val_accuracy=val["accuracy"], val_loss=val.get("loss"),
             test_accuracy=(run["metrics"].get("test") or {}).get("accuracy"),
             epochs=len(run.get("history") or []),
             selected=run.get("best"),
             train_images_per_s=(run.get("last_train") or {}).get("images_per_sec"))
  if keep:
    shutil.copy(os.path.join(workdir, "run.json"), os.path.join(keep, f"{arm}_s{seed}.json"))
  shutil.rmtree(workdir, ignore_errors=True)
  return rec


def summarise(runs: list[dict]) -> dict:
  by_arm: dict[str, list[dict]] = {}
  for r in runs:
    if "error" not in r:
      by_arm.setdefault(r["arm"], []).append(r)
  out = {}
  for arm, rs in by_arm.items():
    accs = [r["val_accuracy"] for r in rs]
    loads = [x for r in rs for x in r.get("load_avg", [])]
    out[arm] = {"seeds": sorted(r["seed"] for r in rs), "overrides": rs[0]["overrides"],
                "val_mean": round(statistics.mean(accs), 5),
                "val_std": round(statistics.stdev(accs), 5) if len(accs) > 1 else None,
                "wall_s_mean": round(statistics.mean(r["wall_s"] for r in rs), 1),
                "train_images_per_s_mean": round(statistics.mean(
                    r.get("train_images_per_s") or 0.0 for r in rs), 1),
                # the highest 1-minute load average seen at a run's start or end (None: runs
                # from before it was recorded): above ~3 on 2 cores the wall is a shared machine's
                "load_avg_max": max(loads) if len(loads) == 2 * len(rs) else None}
    tests = [r.get("test_accuracy") for r in rs]
    if None not in tests:  # reported for the chosen default, never used to choose
      out[arm].update(test_mean=round(statistics.mean(tests), 5),
                      test_std=round(statistics.stdev(tests), 5) if len(tests) > 1 else None)
  return out


def markdown_table(summary: dict, default_arm: str | None = DEFAULT_ARM,
                   base: str = "(configs/cnn.py:anchor, the PyTorch anchor's recipe)") -> str:
  """Arms by val mean, best first: seeds, val mean +- std (points), wall, the steady train
  images/s (the last logging window's) and the machine's load."""
  rows = ["| arm | overrides | seeds | val mean ± std | wall (mean) | train img/s | load avg (max) |",
          "|---|---|---|---|---|---|---|"]
  for arm, s in sorted(summary.items(), key=lambda kv: -kv[1]["val_mean"]):
    std = f" ± {100 * s['val_std']:.2f}" if s["val_std"] is not None else ""
    sets = (", ".join(f"`{o}`" for o in s["overrides"])
            or base)
    load = f"{s['load_avg_max']:.1f}" if s["load_avg_max"] is not None else "not recorded"
    name = f"**{arm}** (the default)" if arm == default_arm else arm
    rows.append(f"| {name} | {sets} | {len(s['seeds'])} | {100 * s['val_mean']:.2f}%{std} "
                f"| {s['wall_s_mean']:.0f} s | {s['train_images_per_s_mean']:,.0f} | {load} |")
  return "\n".join(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--suite", default="cnn", choices=sorted(SUITES),
                 help="cnn: the default recipe's levers; transfer100 / transfer500 / photos: the "
                      "augmentation families on configs/transfer.py and configs/photos.py")
  p.add_argument("--arms", default="base", help="comma-separated; 'all' for every arm")
  p.add_argument("--data-root", default=os.path.join(ROOT, "runs", "recipe_data"),
                 help="where a suite's prepared data is cached (the photo set)")
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--out", help="default: the suite's docs/results/*.json")
  p.add_argument("--keep", help="a folder to copy each run's run.json into")
  p.add_argument("--list", action="store_true", help="print the arms and their overrides")
  p.add_argument("--table", action="store_true",
                 help="print --out's summary as a markdown table (bench/README.md's)")
  a = p.parse_args()
  suite = SUITES[a.suite]
  out = a.out or os.path.join(ROOT, suite.out)
  if a.list:
    print(json.dumps({"config": suite.config, "shared": suite.shared, "arms": suite.arms},
                     indent=2))
    return
  if a.table:
    with open(out) as f:
      print(markdown_table(summarise(json.load(f)["runs"]), suite.default_arm,
                           f"({suite.config} as committed)"))
    return
  arms = list(suite.arms) if a.arms == "all" else a.arms.split(",")
  unknown = [x for x in arms if x not in suite.arms]
  if unknown:
    sys.exit(f"--arms: unknown {unknown}; known in --suite {a.suite}: {sorted(suite.arms)}")
  seeds = [int(s) for s in a.seeds.split(",")]
  doc = {"runs": []}
  if os.path.exists(out):
    with open(out) as f:
      doc = json.load(f)
  if a.keep:
    os.makedirs(a.keep, exist_ok=True)
  data_sets, data_info = suite.data(a.data_root) if suite.data else ([], None)
  if data_info:
    doc["data"] = data_info
  for seed in seeds:
    for arm in arms:
      if any(is_done(r, suite, arm, seed) for r in doc["runs"]):
        continue
      rec = run_one(suite, arm, seed, data_sets, a.keep)
      rec["provenance"] = provenance()
      print(json.dumps({k: rec[k] for k in rec if k != "provenance"}), flush=True)
      doc["runs"].append(rec)
      save(doc, out)
  save(doc, out)
  print(json.dumps(doc["summary"], indent=2))


def is_done(r: dict, suite: Suite, arm: str, seed: int) -> bool:
  """`r` is a finished run of this arm and seed with the same config and overrides. Runs from
  before "config" was recorded ran configs/cnn.py as it was then: the anchor (the cnn suite's)."""
  return (r["arm"] == arm and r["seed"] == seed and r["overrides"] == list(suite.arms[arm])
          and r.get("config", CONFIG) == suite.config
          and r.get("shared", []) == list(suite.shared) and "error" not in r)


def save(doc: dict, path: str) -> None:
  """Atomically, with the summary recomputed from every run in the file."""
  doc["summary"] = summarise(doc["runs"])
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, path)


if __name__ == "__main__":
  main()
