"""Weight averaging (train.ema, jaxclf/train/ema.py) on real runs of the tests' tiny config
(configs/cnn.py:tiny: cnn_tiny with BatchNorm, 512 Fashion-MNIST images per split, 16 steps):

  the average in every step's checkpoint is the one a numpy loop computes from the same steps'
  params and BatchNorm statistics (warm-up ramp, its cap and `every` included);
  the evaluators (test figures, calibration), `load_inference`, `jaxclf evaluate` and the ONNX
  export all run the average, and run.json / export.json say so;
  kill -9 and a rerun end bit-identical to an uninterrupted run, average included;
  two real processes keep the average of one;
  bad train.ema values are one clear error each; the default keeps no average.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclf.config import ConfigError, default_config, load_config
from jaxclf.train.checkpoints import load_inference, restore_state
from jaxclf.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{ROOT}/configs/cnn.py:tiny"
EPS_F32 = 2.0 ** -23
# decay 0.6 with the ramp: min(0.6, (1 + t) / (10 + t)) is the ramp up to step 12 and the cap
# from step 13 on (16 steps), so both are exercised; every 2: updates at even steps only.
DECAY, EVERY = 0.6, 2
EMA = [f"train.ema.decay={DECAY}", f"train.ema.every={EVERY}"]


def tiny(overrides=()):
  return load_config(TINY, overrides=list(overrides), environ={})


def saved_states(workdir) -> dict:
  """{step: TrainState} of every checkpoint under <workdir>/checkpoints/latest, as numpy."""
  from jaxclf.data.transforms import PreprocessSpec
  from jaxclf.models.registry import create_model_from_config
  from jaxclf.train.optimizers import create_optimizer
  from jaxclf.train.state import create_train_state
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  spec = PreprocessSpec.from_json(open(os.path.join(workdir, "preprocessing.json")).read())
  model = create_model_from_config(config, len(spec.class_names))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, spec.input_shape,
                                                create_optimizer(config), ema=True)))
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  try:
    return {s: jax.device_get(restore_state(mngr, s, template, with_meta=False)["state"])
            for s in mngr.all_steps()}
  finally:
    mngr.close()


def weights(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def fashion_test_images(spec, n=512):
  from jaxclf.data.sources.fashion_mnist import load_arrays
  from jaxclf.data.transforms import preprocess_batch
  x, y = load_arrays()["test"]
  return preprocess_batch(list(x[:n]), spec), y[:n]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """16 steps with the average on, a checkpoint at every step (all kept)."""
  workdir = str(tmp_path_factory.mktemp("ema"))
  record = train_and_evaluate(tiny([*EMA, "periodic.checkpoint=1 steps",
                                    "train.keep_checkpoints=16"]), workdir)
  assert record["final_step"] == 16
  return workdir, record, saved_states(workdir)


def test_the_average_is_the_hand_computed_one(ema_run):
  """ema_t = d * ema_(t-2) + (1 - d) * weights_t at even t, d = min(0.6, (1+t)/(10+t))**2, and
  unchanged at odd t; params and BatchNorm statistics alike. The numpy loop starts from the
  checkpoint of step 1 (no update yet: the initial weights) and runs on its own from there."""
  _, _, states = ema_run
  assert sorted(states) == list(range(1, 17))
  assert jax.tree.leaves(states[1].batch_stats)  # cnn_tiny has BatchNorm: its statistics count
  avg = jax.tree.map(np.float32, states[1].ema)
  peak = jax.tree.map(lambda a: np.abs(a).max(), avg)  # the largest magnitude met, per leaf
  capped = []
  for t in range(2, 17):
    now = states[t]
    if t % EVERY:
      for a, b in zip(jax.tree.leaves(now.ema), jax.tree.leaves(states[t - 1].ema)):
        np.testing.assert_array_equal(a, b)  # no update at an odd step
    else:
      ramp = np.float32(1 + t) / np.float32(10 + t)
      capped.append(bool(ramp > DECAY))
      d = np.minimum(np.float32(DECAY), ramp) ** EVERY
      peak = jax.tree.map(lambda p, w: max(p, np.abs(w).max()), peak, weights(now))
      avg = jax.tree.map(lambda a, w: d * a + (np.float32(1) - d) * w, avg, weights(now))
    # Each update rounds its two products and the sum (3 roundings of at most eps/2 of the
    # largest magnitude) and shrinks earlier errors by d < 1: after n updates the average is off
    # by at most n * 3 * eps / 2 * that magnitude (an FMA in XLA only rounds less).
    n = t // EVERY
    for (path, got), want, p in zip(jax.tree_util.tree_leaves_with_path(now.ema),
                                    jax.tree.leaves(avg), jax.tree.leaves(peak)):
      assert np.abs(got - want).max() <= n * 1.5 * EPS_F32 * p, (t, path)
  assert capped == [False] * 6 + [True] * 2  # the ramp at 2..12 (12: 13/22), the cap at 14, 16
  # The average is not a copy of the trained weights: the loop above compared two different
  # things.
  last = states[16]
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(last.ema),
                                                         jax.tree.leaves(weights(last)))) > 1e-3


def _loss(logits, labels) -> float:
  z = logits - logits.max(1, keepdims=True)
  return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))


def test_evaluators_and_loaders_run_the_average(ema_run):
  """run.json's test figures and calibration, `load_inference` and `jaxclf evaluate`'s loader
  are the average's, not the trained weights'."""
  from jaxclf import calibration as calib
  from jaxclf.evaluate.model_loader import load_model
  workdir, record, states = ema_run
  assert record["weights"] == "ema"
  best = record["best"]["step"]
  inf = load_inference(workdir, "best")
  assert inf.step == best and inf.weights == "ema"
  for a, b in zip(jax.tree.leaves(inf.variables), jax.tree.leaves(states[best].ema)):
    np.testing.assert_array_equal(np.asarray(a), b)
  x, y = fashion_test_images(inf.spec)
  ema_logits = inf.raw_logits(x)
  trained_logits = np.asarray(inf.model.apply(weights(states[best]), x, train=False))
  # The run evaluated on the device path in batches of 1000, this on host-preprocessed images
  # in batches of 500: the same float32 network with other kernels and sum orders. cnn_tiny's
  # longest reduction is its Dense layer's 784 inputs, sqrt(784) * eps = 3.3e-6 relative per
  # layer; four layers and the normalisation: 2e-5, doubled for the loss's log-sum-exp.
  tol = 4e-5
  want = record["metrics"]["test"]["loss"]
  assert abs(_loss(ema_logits, y) - want) <= tol * want
  assert abs(_loss(trained_logits, y) - want) > 100 * tol * want  # it is not the trained one
  # Calibration fitted and reported on the average's logits (ECE: 15 bins of 512 images; a
  # rounding that moves one image across a bin edge changes it by at most 2 / 512).
  assert calib.ece(ema_logits, y) == pytest.approx(record["calibration"]["test_ece_before"],
                                                   abs=2 / 512)
  loaded = load_model(workdir)  # `jaxclf evaluate --model-path RUN_DIR`
  np.testing.assert_allclose(loaded.logits(x[:64]), inf.logits(x[:64]), rtol=0, atol=tol)


def test_the_export_serves_the_average(ema_run, tmp_path):
  """`jaxclf export` of the run: the ONNX graph computes the average's (calibrated) logits, and
  export.json records that the weights are the average."""
  from jaxclf.evaluate.model_loader import load_model
  from jaxclf.export.onnx import PARITY_TOLERANCE, export_run
  workdir, _, states = ema_run
  out = str(tmp_path / "export")
  export_run(workdir, out, parity_count=16, reference_count=64)
  meta = json.load(open(os.path.join(out, "export.json")))
  assert meta["source"]["weights"] == "ema"
  inf = load_inference(workdir, "best")
  x, _ = fashion_test_images(inf.spec, 64)
  served = load_model(out).logits(x)  # onnxruntime on model.onnx, as `jaxclf evaluate` runs it
  assert np.abs(served - inf.logits(x)).max() <= PARITY_TOLERANCE
  trained = np.asarray(inf.model.apply(weights(states[inf.step]), x, train=False))
  assert np.abs(served - trained / inf.temperature).max() > 100 * PARITY_TOLERANCE


@pytest.mark.parametrize("override,message", [
    ("train.ema.decay=1.0", "train.ema.decay: 1.0 is out of range [0, 1)"),
    ("train.ema.decay=-0.5", "train.ema.decay: -0.5 is out of range [0, 1)"),
    ("train.ema.every=0", "train.ema.every: 0 is out of range [1, 1000000]"),
    ("train.ema.warmup=2", "train.ema.warmup: expected true/false, got 2"),
    ("train.ema.decy=0.9", "unknown config key 'train.ema.decy'. Did you mean train.ema.decay?"),
])
def test_bad_ema_settings_are_one_clear_error(override, message):
  with pytest.raises(ConfigError) as e:
    tiny([override])
  assert str(e.value).startswith(message), str(e.value)


def test_off_by_default(single_view_tiny_run):
  """The default keeps no average: the state has none, run.json says the trained weights."""
  from jaxclf.train.ema import EmaSettings
  assert default_config().train.ema.decay == 0.0
  assert not EmaSettings.from_config(tiny()).enabled
  workdir, record = single_view_tiny_run
  assert record["weights"] == "trained"
  inf = load_inference(workdir, "best")
  assert inf.weights == "trained"


# Each process keeps its own copy of the replicated state: this wrapper around the loop's final
# evaluation (which receives the finished run) writes that process's copy of the average.
_DRIVER = """
import sys
import jax, numpy as np
from jaxclf.config import load_config
from jaxclf.train import loop
config, workdir, out, sets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
final = loop._final_evaluation
def observe(run, repl):
  np.savez(out, *[np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(run.state.ema)])
  return final(run, repl)
loop._final_evaluation = observe
loop.train_and_evaluate(load_config(config, sets, environ={}), workdir)
"""


@pytest.mark.slow  # a 1-process reference and a 2-process job
def test_two_real_processes_keep_the_average_of_one(tmp_path):
  """tests/test_distributed_trainer.py's 2-process job (127.0.0.1, one CPU device each, 20
  steps) with the average on: both processes end with the same average, bit for bit, and the
  checkpoint's average computes the 1-process run's within that file's float32 drift bound."""
  from test_distributed_trainer import BASE, drift_bound, env, free_port, two_process_sets
  sets = [*BASE, *EMA]
  one = tmp_path / "one"
  assert train_and_evaluate(tiny(sets), str(one))["final_step"] == 20
  two, port = tmp_path / "two", free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _DRIVER, TINY, str(two), str(tmp_path / f"ema{i}.npz"), *sets,
       *two_process_sets(port, i)], env=env(supervised=False), cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
  record = json.load(open(two / "run.json"))
  assert record["topology"]["process_count"] == 2 and record["weights"] == "ema"
  copies = [np.load(tmp_path / f"ema{i}.npz") for i in (0, 1)]
  assert len(copies[0].files) == len(jax.tree.leaves(saved_states(one)[20].ema))
  for name in copies[0].files:  # one replicated program, the same all-reduced sums
    np.testing.assert_array_equal(copies[0][name], copies[1][name])
  got, want = (load_inference(str(w), "latest") for w in (two, one))
  assert got.step == want.step == 20 and got.weights == want.weights == "ema"
  for a, b in zip(jax.tree.leaves(got.variables), copies[0].values()):
    np.testing.assert_array_equal(np.asarray(a), b)  # process 0's copy is the one saved
  # Compared as a function, as that file does (BatchNorm leaves each kernel's scale free): the
  # average mixes the params of steps <= 20, each within drift_bound(step) <= drift_bound(20).
  x = np.random.default_rng(0).normal(size=(256, *want.spec.input_shape)).astype(np.float32)
  a, b = got.raw_logits(x), want.raw_logits(x)
  assert np.abs(a - b).max() / np.abs(b).max() <= drift_bound(20)
