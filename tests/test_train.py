"""Real training runs on a tiny model and a small Fashion-MNIST subset."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxclf.config import load_config
from jaxclf.train.checkpoints import load_inference
from jaxclf.train.loop import NonFiniteError, train_and_evaluate
from resume_check import assert_kill9_resume_is_exact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(overrides=()):
  return load_config(f"{ROOT}/configs/cnn.py:tiny", overrides=list(overrides), environ={})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  # The opt-in confusion-matrix action rides along (one config entry turns it on).
  record = train_and_evaluate(tiny(["periodic.confusion_matrix=1 epochs"]), workdir)
  return workdir, record


def test_run_record_has_everything(tiny_run):
  workdir, record = tiny_run
  on_disk = json.load(open(os.path.join(workdir, "run.json")))
  assert on_disk["status"] == "completed"
  for key in ("config", "dataset", "model", "git", "packages", "hardware", "start", "end",
              "duration_s", "metrics", "best"):
    assert key in on_disk, key
  assert on_disk["dataset"]["version"] and on_disk["dataset"]["name"] == "fashion_mnist"
  assert on_disk["config"]["train.batch_size"] == 64
  assert on_disk["packages"]["jax"] == jax.__version__
  # val and test are kept apart; test comes from the best-by-val checkpoint.
  assert set(on_disk["metrics"]) == {"val", "test"}
  assert 0.0 <= on_disk["metrics"]["test"]["accuracy"] <= 1.0
  assert on_disk["metrics"]["test"]["count"] == 512
  assert on_disk["best"]["metric"] == "val_accuracy"
  # Which paths ran: the conv gradient implementation and on-device augmentation (in memory).
  from jaxclf.models.layers import resolve_conv_impl
  assert on_disk["model"]["conv_impl"] == resolve_conv_impl("auto")
  assert on_disk["model"]["input_path"] == "on_device"
  cal = on_disk["calibration"]
  assert cal["temperature"] > 0 and cal["count"] == 512
  assert {"ece_before", "ece_after", "test_ece_before", "test_ece_after"} <= set(cal)
  spec = json.load(open(os.path.join(workdir, "preprocessing.json")))
  assert spec["temperature"] == cal["temperature"]


def test_the_tiny_config_learns(tiny_run):
  """configs/cnn.py:tiny, as committed, learns in its 16 steps: >= 70% on its own held-out test
  split (512 images; chance is 10%), and so on the validation split that picked the checkpoint,
  with a calibration temperature fitted inside its bounds, not pinned at one. The many tests that
  train it (export, serving, agreement, notebooks) then check a model that classifies."""
  from jaxclf.calibration import T_MAX, T_MIN
  _, record = tiny_run
  assert record["final_step"] == 16 and record["config"]["train.batch_size"] == 64
  test, val = record["metrics"]["test"], record["metrics"]["val"]
  assert test["count"] == 512 and test["accuracy"] >= 0.70, test
  assert val["accuracy"] >= 0.65, val
  t = record["calibration"]["temperature"]
  assert T_MIN * 1.5 < t < T_MAX / 1.5, t
  # Label smoothing leaves the raw model under-confident: T < 1 sharpens it, and lowers the NLL.
  assert t < 0.95, t
  assert record["calibration"]["nll_after"] < record["calibration"]["nll_before"]


def test_tensorboard_events_are_real(tiny_run):
  workdir, _ = tiny_run
  ea = EventAccumulator(os.path.join(workdir, "tb"))
  ea.Reload()
  tags = set(ea.Tags()["scalars"])
  for tag in ("train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm",
              "train/param_norm", "train/steps_per_sec", "train/images_per_sec",
              "train/data_wait_share", "val/loss", "val/accuracy", "test/accuracy"):
    assert tag in tags, tag
  assert "train/augmented_batch" in ea.Tags()["images"]
  cm = ea.Images("val/confusion_matrix")
  assert [e.step for e in cm] == [8, 16] and (cm[0].width, cm[0].height) == (160, 160)
  waits = [e.value for e in ea.Scalars("train/data_wait_share")]
  assert all(0.0 <= w <= 1.0 for w in waits)


def test_checkpoints_and_inference_loading(tiny_run):
  workdir, record = tiny_run
  best = load_inference(workdir, "best")
  latest = load_inference(workdir, "latest")
  assert latest.step == record["final_step"] == 16
  assert best.step == record["best"]["step"]
  assert best.spec.class_names[0] == "T-shirt/top" and best.spec.input_shape == (28, 28, 1)
  from jaxclf.data.sources.fashion_mnist import load_arrays
  from jaxclf.data.transforms import preprocess_batch
  x, y = load_arrays()["test"]
  images = preprocess_batch(list(x[:512]), best.spec)
  logits = best.logits(images)
  if best.config.train.tta_flip:  # the run's test metric averages with the mirrored image
    logits = 0.5 * (logits + best.logits(images[:, :, ::-1]))
  acc = float((logits.argmax(1) == y[:512]).mean())
  # The run's own test metric used the same checkpoint, data and preprocessing.
  assert acc == pytest.approx(record["metrics"]["test"]["accuracy"], abs=1e-6)


def test_early_stopping_stops_and_says_so(tmp_path):
  # No epoch can beat the first by min_delta=0.5 accuracy, so patience 1 stops after epoch 2.
  cfg = tiny(["train.num_epochs=5", "early_stopping.patience=1", "early_stopping.min_delta=0.5"])
  record = train_and_evaluate(cfg, str(tmp_path))
  assert record["status"] == "early_stopped"
  assert [h["epoch"] for h in record["history"]] == [1, 2]


def test_nan_fails_fast_naming_the_step(tmp_path):
  # A custom model (given by import path) whose output turns non-finite at its first step.
  cfg = tiny(["model.name=tests.custom_models:NaNAfterInit"])
  assert dict(cfg.model.kwargs) == {}
  with pytest.raises(NonFiniteError, match=r"non-finite training loss/gradient at step 1 "):
    train_and_evaluate(cfg, str(tmp_path))
  assert json.load(open(tmp_path / "run.json"))["status"] == "failed"


def _run_cli(workdir, extra=(), model="resnet_tiny"):
  cmd = [sys.executable, "-m", "jaxclf.main", f"--config={ROOT}/configs/cnn.py:tiny",
         f"--workdir={workdir}", f"--config.model.name={model}", "--config.train.num_epochs=3",
         "--config.data.limit_per_split=1024", "--config.train.batch_size=32",
         "--config.periodic.checkpoint=7 steps", *extra]
  return cmd


def _assert_same_weights(ref_dir, cut_dir):
  a, b = load_inference(ref_dir, "latest"), load_inference(cut_dir, "latest")
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Logging once an epoch while checkpointing every 7 steps: the resumed run's first log window is
# shorter than the uninterrupted run's unless a checkpoint closes the window in both.
EMA_EVERY_3 = ("--config.train.ema.decay=0.9", "--config.train.ema.every=3",
               "--config.periodic.log=1 epochs")


@pytest.mark.parametrize("model,extra", [
    ("cnn_tiny", EMA_EVERY_3),
    pytest.param("resnet_tiny", (), marks=pytest.mark.slow)], ids=["cnn_tiny-ema", "resnet_tiny"])
def test_kill9_mid_epoch_then_rerun_resumes_exactly(tmp_path, model, extra):
  """The resume contract: kill -9, rerun the same command, end bit-identical to an uninterrupted
  run. The default suite's case carries weight averaging (updated every 3 steps, checkpoints every
  7 steps): the whole saved state (weights,
  optimizer state, average, step) must match. resnet_tiny (BatchNorm statistics, a deeper
  optimizer state) is the slow case."""
  ref_dir, cut_dir, ref, cut = assert_kill9_resume_is_exact(
      tmp_path, lambda w: _run_cli(w, extra, model=model), final_step=96)
  _assert_same_weights(ref_dir, cut_dir)
  if extra == EMA_EVERY_3:
    from test_ema import saved_states
    # Checkpoints every 7 steps and updates every 3 are co-prime, so the resumed segment starts
    # between two updates of the average unless the kill came after step 21, 42, ...
    assert cut["weights"] == ref["weights"] == "ema"
    a, b = saved_states(ref_dir)[96], saved_states(cut_dir)[96]
    assert a.ema is not None
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


EVERY_AUGMENTATION = ("--config.augment.auto=randaugment", "--config.augment.random_erasing=0.5",
                      "--config.augment.mixup=0.8", "--config.augment.cutmix=1.0",
                      "--config.augment.mix_mode=elem")


@pytest.mark.slow
@pytest.mark.parametrize("on_device", ["true", "false"], ids=["device", "grain"])
def test_kill9_resume_is_exact_with_every_augmentation_on(tmp_path, on_device):
  """The resume contract with RandAugment, random erasing, Mixup and CutMix on, on either input
  path: kill -9, rerun the same command, end bit-identical to an uninterrupted run."""
  extra = (*EVERY_AUGMENTATION, f"--config.data.on_device={on_device}")
  ref_dir, cut_dir, ref, _ = assert_kill9_resume_is_exact(
      tmp_path, lambda w: _run_cli(w, extra), final_step=96)
  assert ref["config"]["augment.auto"] == "randaugment"
  assert ref["model"]["input_path"] == ("on_device" if on_device == "true" else "grain")
  _assert_same_weights(ref_dir, cut_dir)


def test_legacy_sweep_specs_read_as_optuna_spaces():
  """The older get_sweep shapes ({'grid': ...}, {'random': ...}) still work; the runs themselves
  are tests/test_sweeps.py's."""
  from jaxclf.sweeps.space import normalize
  grid = normalize({"grid": {"a": [1, 2], "b": [3, 4, 5]}}, "x")
  assert grid["sampler"] == "grid" and grid["trials"] == 6
  assert grid["space"]["b"] == {"categorical": [3, 4, 5]}
  rnd = normalize({"random": {"lr": ("log_uniform", 0.01, 1.0), "ls": ("choice", [0.0, 0.1])},
                   "trials": 4, "seed": 3}, "x")
  assert rnd["sampler"] == "random" and rnd["trials"] == 4 and rnd["seed"] == 3
  assert rnd["space"]["lr"] == {"float": (0.01, 1.0), "log": True}


def test_training_core_imports_no_edge_integrations():
  """The training core never imports export, serving or heavyweight frameworks."""
  code = ("import sys, jaxclf.train.loop, jaxclf.cli, jaxclf.main; "
          "bad = [m for m in ('torch', 'tensorflow', 'onnx', 'onnxruntime', 'jax2onnx', 'fastapi', "
          "'tritonclient', 'mlflow', 'optuna', 'tensorboardX') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout + out.stderr


FIXTURE = os.path.join(ROOT, "tests", "fixtures", "checkpoint_before_loop_state")


def test_resume_from_a_checkpoint_written_before_the_loop_state(tmp_path):
  """A run directory whose checkpoints hold the pre-LoopState `meta` dict (made by the loop
  before issue 17: tests/fixtures/checkpoint_before_loop_state/README.txt) resumes mid-epoch from
  its Grain iterator position and finishes, keeping its history and best."""
  import shutil
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), tmp_path / "checkpoints")
  old_meta = json.load(open(tmp_path / "checkpoints" / "latest" / "12" / "meta" / "metadata"))
  assert "version" not in old_meta and old_meta["epoch"] == 1 and old_meta["iter_state"]
  cfg = tiny(["train.num_epochs=3", "train.keep_checkpoints=1", "data.on_device=false"])
  record = train_and_evaluate(cfg, str(tmp_path))
  assert record["status"] == "completed" and record["model"]["input_path"] == "grain"
  assert record["resumed_from_step"] == 12 and record["final_step"] == 24
  assert [h["step"] for h in record["history"]] == [8, 16, 24]
  assert record["history"][0] == old_meta["history"][0]  # carried over from the old checkpoint
  assert record["best"]["step"] in (8, 16, 24) and record["metrics"]["test"]["count"] == 512
  from jaxclf.train.loop_state import VERSION
  new_meta = json.load(open(tmp_path / "checkpoints" / "latest" / "24" / "meta" / "metadata"))
  assert new_meta["version"] == VERSION and new_meta["history"] == record["history"]


def test_loop_state_reads_version_0_meta_on_the_step_axis():
  from jaxclf.train.loop_state import LoopState
  base = {"best": None, "bad_epochs": 2, "plateau_bad": 1, "plateau_best": 0.5, "history": []}
  # Saved mid-epoch 1 (step 12 of 8-step epochs): the iterator position belongs to epoch 1.
  mid = LoopState.from_json({**base, "epoch": 1, "iter_state": {"next_index": 4}}, step=12,
                            steps_per_epoch=8)
  assert mid.iterator_state_for(1) == {"next_index": 4} and mid.bad_checks == 2
  # Saved at step 8 before epoch 1's validation: the epoch-end actions run on resume, and the
  # exhausted epoch-0 iterator is not applied to epoch 1.
  before = LoopState.from_json({**base, "epoch": 0, "iter_state": {"next_index": 8}}, step=8,
                               steps_per_epoch=8)
  assert before.resume_pending and before.iterator_state_for(1) is None
  after = LoopState.from_json({**base, "epoch": 1, "iter_state": None}, step=8, steps_per_epoch=8)
  assert not after.resume_pending
  # Version 1 round-trips; a newer version or an unknown field is a clear error.
  again = LoopState.from_json(mid.to_json(), step=12, steps_per_epoch=8)
  assert again == mid and "resume_pending" not in mid.to_json()
  with pytest.raises(ValueError, match="newer jaxclf"):
    LoopState.from_json({**mid.to_json(), "version": 99}, step=12, steps_per_epoch=8)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['bad_epochs'\]"):
    LoopState.from_json({**mid.to_json(), "bad_epochs": 1}, step=12, steps_per_epoch=8)


def test_one_periodic_rule_for_every_action():
  from jaxclf.config.periodic import Every, RuleError, itstime
  spe, total = 8, 80
  assert Every.parse("4 steps").interval(spe, total) == 4
  assert Every.parse("1 epoch").interval(spe, total) == 8
  assert Every.parse("0.5 epochs").interval(spe, total) == 4
  assert Every.parse("25%").interval(spe, total) == 20
  assert Every.parse("").interval(spe, total) == 0
  fired = [s for s in range(1, total + 1) if itstime(s, 30, total)]
  assert fired == [30, 60, 80]  # and the last step
  assert not any(itstime(s, 0, total) for s in range(1, total + 1))
  assert itstime(1, 30, total, first=True) and not itstime(80, 30, total, last=False)
  for bad in ("3", "3 stepz", "0 steps", "1.5 steps", "120%"):
    with pytest.raises(RuleError):
      Every.parse(bad)


def test_actions_and_evaluators_match_their_config_tables():
  """Every periodic action has its rule in config.periodic and every evaluator type its fields
  in config/names.py (both also checked at import), and the train.* switches turn the extra
  evaluators on and off."""
  import dataclasses
  from jaxclf.config import default_config
  from jaxclf.config.names import EVALUATOR_ARGS
  from jaxclf.train.actions import ACTIONS
  from jaxclf.train.evaluators import EVALUATORS, create_evaluators
  assert set(ACTIONS) - {"evaluate"} == set(default_config().periodic.keys())
  for name, cls in EVALUATORS.items():
    assert {f.name for f in dataclasses.fields(cls)} - {"name"} == set(EVALUATOR_ARGS[name]) - {
        "type", "enabled"}, name
  assert set(create_evaluators(tiny())) == {"val", "test", "calibration"}
  assert set(create_evaluators(tiny(["train.tta_flip=true", "train.calibrate=false"]))) == {
      "val", "test", "test_tta"}
