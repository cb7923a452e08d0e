"""What a new user sees on the console: ingest names every skipped file, small evaluation splits
are warned about, the best epoch is chosen (and its choice explained) with ties broken on val
loss, the progress bar's rate leaves compilation out, and `evaluate`/`export` print jaxclf's
lines and real warnings only."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import types

import clu.metrics
import jax.numpy as jnp
import numpy as np
import pytest
import tqdm.std

import corpus
from jaxclf import cli
from jaxclf.config import default_config, load_config
from jaxclf.data import data_cli
from jaxclf.data.dataset import MIN_EVAL_IMAGES, small_split_warnings, split_size_warnings
from jaxclf.data.types import ArraySource, Dataset, Split
from jaxclf.tracking.run_record import RunRecord
from jaxclf.train import actions, loop
from jaxclf.train.context import Progress, TrainWindow
from jaxclf.train.loop_state import LoopState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = ("empty.jpg", "notes.jpg", "truncated.jpg")  # zero bytes, text named .jpg, cut JPEG


# ------------------------------------------------------------------------------ ingest


def test_ingest_names_each_skipped_file_with_stage_and_reason(tmp_path, capsys):
  root = tmp_path / "photos"
  corpus.write_class_folder(str(root), {"cat": 10, "dog": 10}, start_seed=300)
  corpus.write_corpus(str(root / "cat"), [i for i in corpus.bad_items() if i.name in BAD])
  out = tmp_path / "ds"
  assert data_cli.main(["data", "ingest", str(root), "--out", str(out)]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["skipped"] == 3  # stdout stays one JSON line for scripts
  manifest = json.loads((out / "manifest.json").read_text())
  listed = {os.path.basename(s["path"]): s for s in manifest["report"]["skipped"]}
  assert sorted(listed) == sorted(BAD)
  assert "[ingest] skipped 3 file(s):" in captured.err
  for s in listed.values():  # each on its own line: path, [stage], reason
    assert f"  {s['path']}  [{s['stage']}] {s['reason']}" in captured.err.splitlines()
  stages = {name: s["stage"] for name, s in listed.items()}
  assert stages == {i.name: i.skip_stage for i in corpus.bad_items() if i.name in BAD}
  # 20 images at 10%/10% leave 2 val and 2 test images: both are warned about, with the fix.
  warnings = [l for l in captured.err.splitlines() if l.startswith("[ingest] warning: small ")]
  assert len(warnings) == 2 and all("--val-fraction" in w for w in warnings)


def test_skip_listing_shows_the_first_n_then_where_the_rest_are():
  skipped = [{"path": f"p/{i}.jpg", "stage": "decode", "reason": "truncated"} for i in range(25)]
  lines = data_cli.format_skipped(skipped, 20, "all are in ds/manifest.json")
  assert lines[:2] == ["  p/0.jpg  [decode] truncated", "  p/1.jpg  [decode] truncated"]
  assert len(lines) == 21 and lines[-1] == "  ... 5 more: all are in ds/manifest.json"
  assert data_cli.format_skipped(skipped[:3], 20, "unused") == lines[:3]


# ------------------------------------------------------------------------------ small splits


def test_small_split_warning_states_threshold_coarseness_and_fix():
  w = small_split_warnings({"train": 160, "val": 20, "test": 20}, "Do X.")
  assert len(w) == 2 and w[0].startswith("small val split: 20 images.")
  # One image in 20 is 5 points; sqrt(0.9 * 0.1 / 20) = 0.0671 is the standard error at 90%.
  assert "one image is 5.0 accuracy points" in w[0] and "±6.7 points" in w[0]
  assert "calibration temperature" in w[0] and "test accuracy and ECE" in w[1]
  assert all(x.endswith("Do X.") and f"below {MIN_EVAL_IMAGES} images" in x for x in w)
  assert small_split_warnings({"val": MIN_EVAL_IMAGES, "test": 10_000}, "") == []
  assert len(small_split_warnings({"val": MIN_EVAL_IMAGES - 1, "test": 0}, "")) == 1


def _dataset(n_val: int, **report) -> Dataset:
  def split(n):
    labels = np.zeros(n, np.int32)
    return Split(ArraySource(np.zeros((n, 2, 2, 1), np.uint8), labels), labels)
  return Dataset("d", ["a"], {"train": split(200), "val": split(n_val), "test": split(200)},
                 "v", report=report)


def test_small_split_fix_fits_where_the_splits_come_from():
  assert "data.val_fraction" in split_size_warnings(_dataset(20))[0]
  assert "--val-fraction" in split_size_warnings(_dataset(20, ingested_version="abc"))[0]
  assert "val/ and test/ folders" in split_size_warnings(_dataset(20, given_splits=["val"]))[0]
  assert "data.limit_per_split=20" in split_size_warnings(_dataset(20, limit_per_split=20))[0]
  assert split_size_warnings(_dataset(500, ingested_version="abc")) == []


def test_training_warns_about_a_small_val_split(tmp_path, caplog):
  root = tmp_path / "photos"
  corpus.write_class_folder(str(root), {"cat": 25, "dog": 25}, start_seed=400)
  config = load_config(f"{REPO}/configs/cnn.py:tiny", environ={},
                       overrides=[f"data.source={root}", "data.limit_per_split=0"])
  with caplog.at_level(logging.WARNING, logger="jaxclf.train"):
    loop._load_and_check_data(config, str(tmp_path), write=False)
  small = [r.getMessage() for r in caplog.records if "small val split" in r.getMessage()]
  assert len(small) == 1 and "raise data.val_fraction" in small[0]


# ------------------------------------------------------------------------------ best epoch


def test_a_val_accuracy_tie_goes_to_the_lower_val_loss():
  probe = {"epoch": 2, "val": {"accuracy": 0.85, "loss": 0.484}}
  better, why = actions.is_better({"accuracy": 0.85, "loss": 0.429}, probe, "val_accuracy", 0.0)
  assert better and why == "val accuracy 0.8500 ties epoch 2; val loss 0.4290 vs 0.4840"
  better, why = actions.is_better({"accuracy": 0.85, "loss": 0.5}, probe, "val_accuracy", 0.0)
  assert not better and "ties epoch 2" in why
  # Accuracy still comes first: higher accuracy wins whatever the loss; lower loses.
  assert actions.is_better({"accuracy": 0.9, "loss": 0.9}, probe, "val_accuracy", 0.0)[0]
  assert not actions.is_better({"accuracy": 0.8, "loss": 0.1}, probe, "val_accuracy", 0.0)[0]
  # A gain within min_delta is no improvement, and says so.
  better, why = actions.is_better({"accuracy": 0.855, "loss": 0.3}, probe, "val_accuracy", 0.01)
  assert not better and why.endswith("within min_delta 0.01")
  # Selecting on val loss: lower wins; a tie goes to the higher accuracy.
  assert actions.is_better({"accuracy": 0.1, "loss": 0.4}, probe, "val_loss", 0.0)[0]
  assert actions.is_better({"accuracy": 0.86, "loss": 0.484}, probe, "val_loss", 0.0)[0]
  assert not actions.is_better({"accuracy": 0.84, "loss": 0.484}, probe, "val_loss", 0.0)[0]
  assert actions.is_better({"accuracy": 0.5, "loss": 2.0}, None, "val_accuracy", 0.0)[0]


def test_the_run_output_says_which_epoch_is_best_and_why(tmp_path, capsys):
  config = default_config()
  run = types.SimpleNamespace(
      loop=LoopState(), config=config, progress=Progress(False, 30, 0),
      record=RunRecord(str(tmp_path)), epoch=lambda step: step // 10, t_start=time.time(),
      epoch_callback=None, best_pending=False, status="completed", stop=False)
  for step, acc, loss in ((10, 0.80, 0.6), (20, 0.85, 0.484), (30, 0.85, 0.429)):
    actions.select(run, step, {"accuracy": acc, "loss": loss})
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith("best: this epoch (val accuracy 0.8000, the first validation)")
  assert lines[1].endswith("best: this epoch (val accuracy 0.8500 vs 0.8000 at epoch 1)")
  assert lines[2].endswith("best: this epoch (val accuracy 0.8500 ties epoch 2; val loss "
                           "0.4290 vs 0.4840)")
  assert run.loop.best["epoch"] == 3 and run.record.data["metrics"]["val"]["loss"] == 0.429


# ------------------------------------------------------------------------------ rate and ETA


class FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self) -> float:
    return self.t


def _metric():
  return clu.metrics.Average.from_model_output(jnp.ones(4))


def test_images_per_second_leaves_the_compiling_step_out():
  clock = FakeClock()
  window = TrainWindow(clock=clock)
  clock.t = 200.0  # the first step traced and compiled for 200 s
  window.add(_metric(), wait_s=3.0)
  assert window.steps == 0 and window.metrics is not None
  for _ in range(10):  # then 10 steps of 0.5 s, 0.1 s of each waiting for data
    clock.t += 0.5
    window.add(_metric(), wait_s=0.1)
  rates = actions.window_rates(window, batch_size=32)
  assert rates["steps_per_sec"] == pytest.approx(2.0)
  assert rates["images_per_sec"] == pytest.approx(64.0)
  assert rates["data_wait_share"] == pytest.approx(0.2)
  assert float(window.metrics.compute()) == 1.0  # the compiling step's metrics still count


def test_progress_eta_leaves_the_compiling_step_out(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(tqdm.std, "time", clock)  # the clock each bar takes when created
  progress = Progress(True, total=111, initial=0)
  clock.t = 200.0
  progress.update(1)  # the compiling step
  for _ in range(10):  # then one step a second
    clock.t += 1.0
    progress.update(1)
  d = progress.bar.format_dict
  assert d["n"] == 11 and d["elapsed"] == pytest.approx(10.0)
  assert d["rate"] == pytest.approx(1.0)  # the ETA: (111 - 11) / rate = 100 s
  progress.close()


# ------------------------------------------------------------------------------ console noise

NOISE = ("libtpu", "backend 'tpu'", "MaxText", "MaxDiffusion", " INFO root:")


def _user_env() -> dict:
  """The environment of a user's shell: the test suite's JAX_PLATFORMS=cpu would skip JAX's
  probe for a TPU, which is the noise being checked for."""
  return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAXCLF_LOGLEVEL")}


def _run(args, tmp_path) -> subprocess.CompletedProcess:
  out = subprocess.run(args, cwd=REPO, env=_user_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  noise = [line for line in out.stderr.splitlines() if any(n in line for n in NOISE)]
  assert noise == [], noise
  return out


def test_console_logging_keeps_jaxclf_info_and_library_warnings():
  """What `jaxclf` and `python -m jaxclf.main` set up, checked on the loggers themselves: the
  noisy libraries' INFO lines are off, their warnings and jaxclf's INFO lines are on."""
  root, ours = logging.getLogger(), logging.getLogger("jaxclf")
  saved = root.level, ours.level, list(root.handlers)
  try:
    cli.configure_logging()
    for name in ("jax._src.xla_bridge", "jax2onnx.plugins.examples.maxtext.maxtext_models",
                 "jax2onnx.plugins.examples.maxdiffusion.maxdiffusion_models", "absl"):
      logger = logging.getLogger(name)
      assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    assert logging.getLogger("jaxclf.train").isEnabledFor(logging.INFO)
    serde = logging.getLogger("onnx_ir.serde")
    note = serde.makeRecord("onnx_ir.serde", logging.WARNING, __file__, 1,
                            "The value type for shape %s is not known.", ([1],), None)
    assert not serde.filter(note) and serde.filter(serde.makeRecord(
        "onnx_ir.serde", logging.WARNING, __file__, 1, "another warning", (), None))
  finally:
    root.setLevel(saved[0])
    ours.setLevel(saved[1])
    root.handlers[:] = saved[2]


def test_evaluate_prints_no_library_info_lines(single_view_tiny_run, tmp_path):
  run_dir, _ = single_view_tiny_run
  out = _run([sys.executable, "-m", "jaxclf.cli", "evaluate", "--model-path", run_dir,
              "--test-data", "fashion_mnist", "--max-examples", "128",
              "--out", str(tmp_path / "eval")], tmp_path)
  assert json.loads(out.stdout.strip().splitlines()[-1])["examples"] == 128


@pytest.mark.slow  # 20-35 s on a loaded 2-core machine: conversion and parity check included
def test_export_prints_no_library_info_lines(single_view_tiny_run, tmp_path):
  run_dir, _ = single_view_tiny_run
  _run([sys.executable, "-m", "jaxclf.cli", "export", "--run", run_dir,
        "--out", str(tmp_path / "export")], tmp_path)
  assert (tmp_path / "export" / "model.onnx").exists()


def test_main_entry_shows_jaxclf_info_lines(single_view_tiny_run, tmp_path):
  """`python -m jaxclf.main` (absl's app.run installs its handler first) logs as `jaxclf train`
  does. Rerunning a finished run resumes at its end: only the final evaluation runs."""
  run_dir = shutil.copytree(single_view_tiny_run[0], tmp_path / "run")
  out = _run([sys.executable, "-m", "jaxclf.main", f"--config={REPO}/configs/cnn.py:tiny",
              f"--workdir={run_dir}", "--config.train.tta_flip=false"], tmp_path)
  assert " INFO jaxclf.train: test accuracy " in out.stderr
