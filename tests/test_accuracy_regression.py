"""Accuracy regression: a fixed short run of the default CNN must reach a documented floor.

Setup: configs/cnn.py (the default model, optimizer, schedule, label smoothing, +-2 px translate and
flip on the device, single-view test accuracy), seed 0, the first 4,096 images of each split
(data.limit_per_split), 3 epochs at batch 128 (96 steps), scored on 4,096 test images. About 50 s
on the 2-core machine.

The floor: runs are bit-deterministic for a given seed on one machine (see the resume test), so
the noise that matters is across seeds and CPU types. Measured on the dev machine (AMD EPYC with
AVX-512, 2 cores, 2026-12-07, oneDNN conv) for the default with its whitening stem, Dirac init and
frozen BatchNorm scales, seeds 0/1/2: FLOOR_EVIDENCE (spread 3.9 points; in 96 steps the levers
trail the anchor recipe, which gave 0.7808 / 0.7673 / 0.7646, and lead it after 10 epochs). The
floor sits 3 points under the lowest seed, outside seed noise; a real regression (a broken loss,
schedule, augmentation, whitening fit or BatchNorm) costs more than that.
"""
import os

from jaxclf.config import load_config
from jaxclf.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["data.limit_per_split=4096", "train.batch_size=128", "train.num_epochs=3",
             "augment.translate=2", "train.progress_bar=false", "periodic.checkpoint=1000 steps",
             "seed=0"]
# `jaxclf train --config configs/cnn.py --set <each of OVERRIDES> --set seed=S`, test accuracy:
FLOOR_EVIDENCE = {"seed0": 0.7083, "seed1": 0.7317, "seed2": 0.7473}
FLOOR = 0.67


def test_short_default_run_reaches_the_floor(tmp_path):
  cfg = load_config(f"{ROOT}/configs/cnn.py", overrides=OVERRIDES, environ={})
  record = train_and_evaluate(cfg, str(tmp_path))
  acc = record["metrics"]["test"]["accuracy"]
  assert record["metrics"]["test"]["count"] == 4096
  assert acc >= FLOOR, f"test accuracy {acc:.4f} fell below the floor {FLOOR} (evidence {FLOOR_EVIDENCE})"
