"""Orbax checkpoints: the latest N (for resuming) and the best-by-validation one (for evaluation
and export), each step holding the full TrainState plus JSON metadata (epoch, Grain iterator
state, early-stopping and plateau state). Layout: <run>/checkpoints/{latest,best}/<step>/.

Resume order (the same command resumes): 1. <run>/checkpoints/latest, newest step;
2. model.pretrained (ImageNet weights or another run's best checkpoint; params only);
3. a fresh initialisation from config.seed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxclf import diskspace
from jaxclf.train import ema as ema_lib


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr, step: int, state_template, with_meta: bool = True) -> dict[str, Any]:
  """{'state': TrainState[, 'meta': loop-state JSON]} of checkpoint `step`. A checkpoint written
  before an optional TrainState field existed (one that is None here, e.g. loss_scale) has no
  such entry on disk: it is restored without it and the field keeps None.

  The weight average (`ema`) holds values on disk exactly when train.ema was on at the save: one
  saved without them, restored with train.ema on, starts the average from its weights; one saved
  with them, restored with train.ema off, drops them (the trained weights go on)."""
  def restore(state_item):
    items = {"state": ocp.args.StandardRestore(state_item)}
    if with_meta:
      items["meta"] = ocp.args.JsonRestore()
    return mngr.restore(step, args=ocp.args.Composite(**items))

  abstract = _abstract(state_template)
  try:
    return dict(restore(abstract))
  except ValueError as e:
    if "tree structures do not match" not in str(e):
      raise
  fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)
            if f.metadata.get("pytree_node", True)}
  # The item mirrors the saved tree: its fields, each with a value or as None.
  item = {}
  for name, has_value in _saved_fields(mngr, step).items():
    if has_value and fields.get(name) is None and name == "ema":  # restored only to be dropped
      item[name] = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    else:  # any other mismatch is orbax's own error, naming the field
      item[name] = fields.get(name) if has_value else None
  out = dict(restore(item))
  out["state"] = state_template.replace(
      **{k: v for k, v in out["state"].items() if fields.get(k) is not None})
  if fields.get("ema") is not None and item.get("ema") is None:
    out["state"] = ema_lib.start(out["state"])
  return out


def _saved_fields(mngr, step: int) -> dict[str, bool]:
  """The TrainState fields checkpoint `step` holds: name -> whether with a value (not None)."""
  path = epath.Path(str(mngr.directory)) / str(step) / "state"
  tree = ocp.StandardCheckpointHandler().metadata(path)
  return {name: value is not None for name, value in tree.items()}


def _array_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class Checkpointer:
  """Orbax's atomic commit: a step is written under `<step>.orbax-checkpoint-tmp` and renamed to
  `<step>` when complete, so a listing never shows a half-written step. A full disk stops the run
  with a DiskFullError (path, bytes needed, the step a rerun resumes from): checked before each
  save from the size of the last committed step, and translated from the ENOSPC an asynchronous
  save meets, after its temporary directory is removed."""

  def __init__(self, run_dir: str, keep: int = 2):
    root = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    # With several processes every one saves its part, and orbax synchronises them at barriers
    # named by step: the two managers save the same step concurrently (asynchronously), so
    # each gets its own barrier names, or their barriers cross and the job hangs.
    # cleanup_tmp_directories: a step left half-written (kill -9, a full disk) is deleted when the
    # run resumes, giving its space back; it is never listed, so never restored.
    opts = lambda kind, keep: ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind))
    self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=opts("latest", keep))
    self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=opts("best", 1))
    self._pending: dict[int, tuple[int, int]] = {}  # id(manager) -> (step, bytes) being saved
    self.failed = False

  def save(self, state, loop_state, best: bool = False) -> None:
    """The TrainState plus the loop's LoopState (jaxclf/train/loop_state.py) as JSON, under the
    item name 'meta' that checkpoints have always used."""
    step = int(jax.device_get(state.step))
    mngr = self.best if best else self.latest
    self._settle(mngr)  # a failure of the previous asynchronous save surfaces here, named
    if mngr.latest_step() == step:
      return
    meta = loop_state.to_json()
    needed = self._needed_bytes(state, meta)
    diskspace.require(os.path.join(str(mngr.directory), str(step)), needed,
                      f"checkpoint step {step}", self._resume_hint())
    # Should the estimate still fall short, the message names the uncompressed size.
    self._pending[id(mngr)] = (step, max(needed, _array_bytes(state)))
    try:
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)))
    except Exception as e:
      self._raise_if_disk_full(mngr, e)
      raise

  def _needed_bytes(self, state, meta) -> int:
    """About what the next step takes on disk: the newest committed step's size (same state
    structure), else the state's array bytes; plus the loop state and room for metadata files."""
    for mngr in (self.latest, self.best):
      step = mngr.latest_step()
      if step is not None:
        size = diskspace.tree_bytes(os.path.join(str(mngr.directory), str(step)))
        if size:
          return size + len(json.dumps(meta, default=str))
    return _array_bytes(state) + len(json.dumps(meta, default=str)) + 64 * 1024

  def _resume_hint(self) -> str:
    last = self.latest.latest_step()
    return ("free space and rerun the same command: it resumes from checkpoint step "
            f"{last}" if last is not None else "free space and rerun the same command")

  def _settle(self, mngr) -> None:
    try:
      mngr.wait_until_finished()
    except Exception as e:
      self._raise_if_disk_full(mngr, e)
      raise

  def _raise_if_disk_full(self, mngr, e: BaseException) -> None:
    """ENOSPC in an asynchronous save: remove its temporary directory (space back, nothing
    half-written left behind) and raise DiskFullError for the step that failed."""
    self.failed = True
    if not diskspace.is_enospc(e):
      return
    root = str(mngr.directory)
    for name in os.listdir(root):
      if ocp.utils.TMP_DIR_SUFFIX in name:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    step, needed = self._pending.pop(id(mngr), (None, 0))
    path = os.path.join(root, str(step))
    raise diskspace.DiskFullError(diskspace.message(
        path, needed, f"checkpoint step {step}", self._resume_hint())) from None

  def restore_latest(self, state_template):
    """Returns (state, loop-state JSON of any version) from the newest 'latest' checkpoint, or
    None; LoopState.from_json reads the JSON."""
    return self._restore(self.latest, state_template)

  def restore_best(self, state_template):
    return self._restore(self.best, state_template)

  @staticmethod
  def _restore(mngr, state_template):
    step = mngr.latest_step()
    if step is None:
      return None
    out = restore_state(mngr, step, state_template)
    return out["state"], out["meta"]

  def wait(self) -> None:
    self._settle(self.latest)
    self._settle(self.best)

  def close(self) -> None:
    """Waits for the asynchronous saves and closes. After a failed save the run is already
    stopping with that error: closing must not replace it with a second report of the same."""
    try:
      self.wait()
    except Exception:
      if not self.failed:
        raise
    for mngr in (self.latest, self.best):
      try:
        mngr.close()
      except Exception:
        if not self.failed:
          raise


# ----------------------------------------------------------------------------- inference loading

@dataclasses.dataclass
class InferenceModel:
  """A trained model ready to predict: what evaluate, export and serving need from a run dir."""
  model: Any
  variables: dict
  spec: Any  # jaxclf.data.transforms.PreprocessSpec (class_names included)
  config: Any
  step: int
  run_dir: str
  which: str
  weights: str = "trained"  # "ema": `variables` are the train.ema average (ema.weights_kind)

  def __post_init__(self):
    apply = self.model.apply
    self._fn = jax.jit(lambda v, x: apply(v, x, train=False))

  @property
  def class_names(self) -> list[str]:
    return list(self.spec.class_names)

  @property
  def temperature(self) -> float:
    """The run's fitted temperature (preprocessing.json), 1.0 when it was never calibrated."""
    return float(getattr(self.spec, "temperature", 1.0))

  def logits(self, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """float32 NHWC preprocessed images -> calibrated float32 logits, raw / spec.temperature:
    the same numbers the ONNX export outputs (it bakes the division into its graph), so softmax
    of these is the served confidence. Pads the last batch to one shape."""
    out = self.raw_logits(x, batch_size)
    t = self.temperature
    return out if t == 1.0 else (out / np.float32(t)).astype(np.float32)

  def raw_logits(self, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The network's own logits, before temperature scaling (what checkpoints, training
    metrics and temperature fitting see)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.spec.input_shape):
      raise ValueError(f"model input must be (N, {', '.join(map(str, self.spec.input_shape))}), "
                       f"got {tuple(x.shape)}")
    out = []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      n = len(chunk)
      if n < batch_size and len(x) > batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
      out.append(np.asarray(self._fn(self.variables, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0, len(self.spec.class_names)), np.float32)


def load_inference(run_dir: str, which: str | int = "best") -> InferenceModel:
  """Loads a run's model for inference. `which`: 'best' (default; falls back to 'latest' when no
  validation ever ran), 'latest', or a step number found in either."""
  import ml_collections

  from jaxclf.data.transforms import PreprocessSpec
  from jaxclf.models.registry import create_model_from_config
  from jaxclf.train.ema import EmaSettings, inference_variables, weights_kind
  from jaxclf.train.state import create_train_state

  run_dir = os.path.abspath(run_dir)
  cfg_path = os.path.join(run_dir, "config.json")
  spec_path = os.path.join(run_dir, "preprocessing.json")
  if not os.path.isfile(cfg_path) or not os.path.isfile(spec_path):
    raise FileNotFoundError(f"{run_dir} is not a jaxclf run directory (no config.json / "
                            "preprocessing.json); train one with `jaxclf train`")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(spec_path) as f:
    spec = PreprocessSpec.from_json(f.read())
  model = create_model_from_config(config, len(spec.class_names))
  from jaxclf.train.optimizers import create_optimizer
  # Restoring the whole TrainState (same optimizer structure as training) is the path that is
  # exercised on every resume; inference then keeps the weights it serves only (the average when
  # train.ema was on: ema.inference_variables).
  # eval_shape: the restore template needs shapes and dtypes only, so nothing is compiled or run.
  ema = EmaSettings.from_config(config).enabled
  template = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, spec.input_shape,
                                                       create_optimizer(config), ema=ema))
  # Onto this process's first device, whatever mesh saved it (2 processes, 4 devices, a GPU):
  # without a target sharding orbax would rebuild the saving topology and refuse.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          template)
  root = os.path.join(run_dir, "checkpoints")
  order = {"best": ["best", "latest"], "latest": ["latest"]}.get(str(which), ["best", "latest"])
  for kind in order:
    d = os.path.join(root, kind)
    if not os.path.isdir(d):
      continue
    mngr = ocp.CheckpointManager(d)
    steps = mngr.all_steps()
    if isinstance(which, int) or str(which).isdigit():
      steps = [s for s in steps if s == int(which)]
    if not steps:
      mngr.close()
      continue
    step = max(steps)
    restored = restore_state(mngr, step, template, with_meta=False)
    mngr.close()
    st = restored["state"]
    return InferenceModel(model, inference_variables(st), spec, config, int(step), run_dir, kind,
                          weights=weights_kind(st))
  raise FileNotFoundError(f"{run_dir}: no checkpoint {which!r} under {root}")
