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
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr, step: int, state_template, with_meta: bool = True) -> dict[str, Any]:
  """{'state': TrainState[, 'meta': loop-state JSON]} of checkpoint `step`. A checkpoint written
  before an optional TrainState field existed (one that is None here, e.g. loss_scale) has no
  such entry on disk: it is restored without it and the field keeps None."""
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
  present = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)
             if f.metadata.get("pytree_node", True) and getattr(abstract, f.name) is not None}
  out = dict(restore(present))
  out["state"] = state_template.replace(**out["state"])
  return out


class Checkpointer:
  def __init__(self, run_dir: str, keep: int = 2):
    root = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    # With several processes every one saves its part, and orbax synchronises them at barriers
    # named by step: the two managers save the same step concurrently (asynchronously), so
    # each gets its own barrier names, or their barriers cross and the job hangs.
    opts = lambda kind, keep: ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind))
    self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=opts("latest", keep))
    self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=opts("best", 1))

  def save(self, state, loop_state, best: bool = False) -> None:
    """The TrainState plus the loop's LoopState (jaxclf/train/loop_state.py) as JSON, under the
    item name 'meta' that checkpoints have always used."""
    step = int(jax.device_get(state.step))
    mngr = self.best if best else self.latest
    if mngr.latest_step() == step:
      return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(loop_state.to_json())))

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
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


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
  # exercised on every resume; inference then keeps params and batch statistics only.
  # eval_shape: the restore template needs shapes and dtypes only, so nothing is compiled or run.
  template = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, spec.input_shape,
                                                       create_optimizer(config)))
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
    return InferenceModel(model, {"params": st.params, "batch_stats": st.batch_stats},
                          spec, config, int(step), run_dir, kind)
  raise FileNotFoundError(f"{run_dir}: no checkpoint {which!r} under {root}")
