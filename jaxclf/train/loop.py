"""train_and_evaluate(config, workdir): the whole training run.

  validate config -> load + check data (errors before any compute) -> model, optimizer, state
  -> resume (latest checkpoint | pretrained | fresh) -> epochs of jitted, data-parallel steps
  -> per-epoch validation, early stopping, best checkpoint, plateau -> test on the best checkpoint
  -> run.json.
The training core imports no export, serving or tracking-server code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxclf.config import validate
from jaxclf.data import device_augment, pipeline, transforms
from jaxclf.data.dataset import DataError, class_weights, load_dataset, write_report
from jaxclf.models.layers import resolve_conv_impl
from jaxclf.models.registry import create_model_from_config
from jaxclf.tracking.run_record import RunRecord
from jaxclf.train import inputs, steps
from jaxclf.train.checkpoints import Checkpointer
from jaxclf.train.optimizers import create_optimizer
from jaxclf.train.schedules import create_learning_rate_fn
from jaxclf.train.state import count_params, create_train_state
from jaxclf.train.writer import MetricWriter

log = logging.getLogger("jaxclf.train")


class NonFiniteError(FloatingPointError):
  pass


def create_preprocess_spec(config, class_names) -> transforms.PreprocessSpec:
  size = int(config.preprocessing.image_size)
  return transforms.PreprocessSpec(
      image_size=(size, size), channels=int(config.data.channels),
      mean=tuple(config.preprocessing.mean), std=tuple(config.preprocessing.std),
      resize=config.preprocessing.resize, crop_fraction=float(config.preprocessing.crop_fraction),
      class_names=tuple(class_names))


def _make_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("data",))


class _Progress:
  """tqdm bar with ETA when available and enabled; plain log lines otherwise."""

  def __init__(self, enabled: bool, total: int, initial: int):
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.05)
      except ImportError:
        pass

  def update(self, n: int, **postfix):
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _improved(value, best, mode, min_delta):
  if best is None:
    return True
  return value > best + min_delta if mode == "max" else value < best - min_delta


def evaluate_split(state, split, spec, config, eval_steps, data_sharding, failures=None,
                   with_logits: bool = False) -> dict:
  """Loss and accuracy of `state` on every example of `split` (padding masked out).
  `eval_steps`: {on_device: jitted eval step} for uint8 (device) or preprocessed (host) batches."""
  bs = int(config.train.eval_batch_size)
  n_dev = data_sharding.mesh.size
  bs = max(n_dev, bs - bs % n_dev)
  on_device = inputs.use_device_path(config.data.on_device, split, spec, None)
  total, logits, labels = None, [], []
  for batch in inputs.eval_batches(split, spec, bs, on_device=on_device,
                                   max_pixels=int(config.data.max_pixels),
                                   read_threads=int(config.data.read_threads), failures=failures):
    m, out = eval_steps[on_device](state, jax.device_put(batch, data_sharding))
    total = m if total is None else total.merge(m)
    if with_logits:
      keep = batch["label"] >= 0
      logits.append(np.asarray(out)[keep])
      labels.append(batch["label"][keep])
  if total is None:
    return {}
  c = total.compute()
  result = {"loss": float(c["loss"]), "accuracy": float(c["accuracy"]),
            "count": int(jax.device_get(total.accuracy.count))}
  if with_logits:
    result["logits"], result["labels"] = np.concatenate(logits), np.concatenate(labels)
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       epoch_callback=None) -> dict[str, Any]:
  """Trains, evaluates on the held-out test split with the best checkpoint, returns run.json.

  `epoch_callback(entry)`, if given, runs after each validation with that epoch's history entry
  (epoch, step, val_loss, val_accuracy, train_loss: validation only, never test). A truthy return
  stops the run with that string as its status (a sweep's pruner returns "pruned")."""
  validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  # ---- data: every problem surfaces here, before any compilation.
  dataset = load_dataset(config.data)
  for name in ("train", "val"):
    if len(dataset.split(name).labels) == 0:
      raise DataError(f"data.source {config.data.source!r}: the {name} split is empty")
  spec = create_preprocess_spec(config, dataset.class_names)
  if dataset.image_shape and dataset.image_shape[2] not in (1, 3):
    raise DataError(f"images have {dataset.image_shape[2]} channels; expected 1 or 3")
  aug = transforms.AugmentSpec.from_config(config.augment)
  write_report(dataset, os.path.join(workdir, "data_report.json"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=list)
  with open(os.path.join(workdir, "preprocessing.json"), "w") as f:
    f.write(spec.to_json())

  mesh = _make_mesh()
  n_dev = mesh.size
  batch_size = int(config.train.batch_size)
  if batch_size % n_dev:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {n_dev} devices")
  train_split = dataset.split("train")
  steps_per_epoch = len(train_split.labels) // batch_size
  if steps_per_epoch == 0:
    raise DataError(f"train.batch_size={batch_size} is larger than the train split "
                    f"({len(train_split.labels)} images)")
  total_steps = steps_per_epoch * int(config.train.num_epochs)
  max_steps = int(config.train.max_steps) or total_steps

  # ---- model and state.
  model = create_model_from_config(config, dataset.num_classes)
  conv_impl = resolve_conv_impl(config.model.conv_impl)
  if hasattr(model, "conv_impl"):  # built-ins; a custom model keeps its own convolutions
    model = model.clone(conv_impl=conv_impl)
  lr_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config)
  rng = jax.random.key(int(config.seed))
  init_rng, dropout_key, augment_key = jax.random.split(rng, 3)
  state = create_train_state(init_rng, model, spec.input_shape, tx)
  ckpt = Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
  meta: dict[str, Any] = {"epoch": 0, "iter_state": None, "best": None, "bad_epochs": 0,
                          "plateau_bad": 0, "plateau_best": None, "history": []}
  restored = ckpt.restore_latest(state)
  resumed_step = None
  if restored is not None:
    state, meta = restored
    resumed_step = int(state.step)
    log.info("resuming from %s/checkpoints/latest at step %d", workdir, resumed_step)
  elif config.model.pretrained:
    from jaxclf.models.pretrained import load_pretrained  # only when asked for
    variables = load_pretrained(config.model.pretrained, model,
                                {"params": state.params, "batch_stats": state.batch_stats},
                                dataset.num_classes)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])

  repl = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  state = jax.device_put(state, repl)
  cw = jnp.asarray(class_weights(train_split.labels, dataset.num_classes,
                                 config.train.class_weights))
  failures = pipeline.DecodeFailures()
  train_input = inputs.TrainInput(
      train_split, spec, aug, batch_size, steps_per_epoch, int(config.seed), config.data.sampler,
      on_device=inputs.use_device_path(config.data.on_device, train_split, spec, aug),
      grain_transform=pipeline.TrainTransform(spec, aug, int(config.data.max_pixels), failures),
      read_threads=int(config.data.read_threads), prefetch=int(config.data.prefetch_batches),
      worker_processes=int(config.data.worker_processes))
  train_step = jax.jit(
      partial(steps.train_step, lr_fn=lr_fn, label_smoothing=float(config.train.label_smoothing),
              class_weights=cw, dropout_key=dropout_key,
              prepare=train_input.prepare_fn(augment_key)),
      in_shardings=(repl, data_sharding), out_shardings=(repl, repl), donate_argnums=(0,))
  eval_steps, tta_eval_steps = ({
      on_device: jax.jit(partial(steps.eval_step, num_classes=dataset.num_classes, tta_flip=tta,
                                 prepare=device_augment.make_prepare_fn(spec, None, None)
                                 if on_device else None),
                         in_shardings=(repl, data_sharding), out_shardings=(repl, repl))
      for on_device in (False, True)} for tta in (False, True))

  writer = MetricWriter(os.path.join(workdir, "tb"))
  record = RunRecord(workdir)
  n_params = count_params(state.params)
  record.start(config, dataset.summary(), {"name": config.model.name, "params": n_params,
                                           "kwargs": dict(config.model.kwargs),
                                           "conv_impl": getattr(model, "conv_impl", "model's own"),
                                           "input_path": "on_device" if train_input.on_device
                                           else "grain"}, resumed_step)
  if resumed_step is None:
    writer.write_hparams({k: v for k, v in record.data["config"].items()
                          if not isinstance(v, list)})
  es = config.early_stopping
  es_mode = "max" if es.metric.endswith("accuracy") else "min"
  log.info("model %s: %d params, conv %s; %d train / %d val / %d test images; %d steps/epoch on "
           "%d device(s); batches %s", config.model.name, n_params, conv_impl,
           len(train_split.labels), len(dataset.split("val").labels),
           len(dataset.splits.get("test").labels) if "test" in dataset.splits else 0,
           steps_per_epoch, n_dev, "augmented on the device" if train_input.on_device
           else "from Grain")

  step = int(jax.device_get(state.step))
  progress = _Progress(bool(config.train.progress_bar), min(total_steps, max_steps), step)
  status = "completed"
  t_run = time.time()
  try:
    epoch = int(meta["epoch"])
    while epoch < int(config.train.num_epochs) and step < max_steps:
      it = train_input.epoch_batches(epoch, step, meta.get("iter_state"))
      meta["iter_state"] = None
      window = {"wait": 0.0, "t0": time.time(), "steps": 0}
      acc_metrics = None
      prev = None  # the previous step's metrics: checked for NaN while this step runs
      while step < max_steps:
        t_wait = time.time()
        try:
          batch = next(it)
        except StopIteration:
          break
        window["wait"] += time.time() - t_wait
        if step == 0 or (resumed_step is not None and step == resumed_step):
          grid = transforms.image_grid(train_input.preview(batch, augment_key, step))
          writer.write_images(step, {"train/augmented_batch": grid})
        state, m = train_step(state, jax.device_put(batch, data_sharding))
        if prev is not None:
          _check_finite(prev, step)  # blocks only on the previous step: the queue stays full
        prev = m
        acc_metrics = m if acc_metrics is None else acc_metrics.merge(m)
        step += 1
        window["steps"] += 1
        progress.update(1)
        if step % int(config.train.log_every_steps) == 0 or step == max_steps:
          _check_finite(m, step)
          c = {k: float(v) for k, v in acc_metrics.compute().items()}
          dt = time.time() - window["t0"]
          c.update({"steps_per_sec": window["steps"] / dt,
                    "images_per_sec": window["steps"] * batch_size / dt,
                    "data_wait_share": window["wait"] / dt, "epoch": step / steps_per_epoch})
          writer.write_scalars(step, {f"train/{k}": v for k, v in c.items()})
          progress.update(0, loss=f"{c['loss']:.3f}", acc=f"{c['accuracy']:.3f}",
                          img_s=f"{c['images_per_sec']:.0f}", wait=f"{c['data_wait_share']:.1%}")
          meta.setdefault("last_train", {}).update(c)
          acc_metrics, window = None, {"wait": 0.0, "t0": time.time(), "steps": 0}
        if step % int(config.train.checkpoint_every_steps) == 0 and step < max_steps:
          ckpt.save(state, {**meta, "epoch": epoch, "iter_state": train_input.iterator_state(it)})
      if prev is not None:
        _check_finite(prev, step)
      if step >= max_steps and step % steps_per_epoch:
        ckpt.save(state, {**meta, "epoch": epoch, "iter_state": train_input.iterator_state(it)})
        break  # a max_steps stop mid-epoch: no epoch-end evaluation
      epoch += 1
      meta["epoch"] = epoch
      if epoch % int(config.train.eval_every_epochs) == 0 or epoch == int(config.train.num_epochs):
        val = evaluate_split(state, dataset.split("val"), spec, config, eval_steps, data_sharding,
                             failures)
        writer.write_scalars(step, {"val/loss": val["loss"], "val/accuracy": val["accuracy"]})
        meta["history"].append({"epoch": epoch, "step": step, "val_loss": val["loss"],
                                "val_accuracy": val["accuracy"],
                                "train_loss": meta.get("last_train", {}).get("loss"),
                                "wall_time": time.time()})
        progress.write(f"epoch {epoch}/{config.train.num_epochs} step {step}: val loss "
                       f"{val['loss']:.4f} acc {val['accuracy']:.4f} "
                       f"({time.time() - t_run:.0f}s)")
        value = val["accuracy"] if es_mode == "max" else val["loss"]
        if _improved(value, meta["best"] and meta["best"]["value"], es_mode, float(es.min_delta)):
          meta["best"] = {"step": step, "epoch": epoch, "metric": es.metric, "value": value,
                          "val": val}
          meta["bad_epochs"] = 0
          ckpt.save(state, {**meta, "iter_state": None}, best=True)
        else:
          meta["bad_epochs"] += 1
        if config.schedule.name == "plateau":
          state, meta = _plateau(state, meta, val["loss"], config.schedule, writer, step)
        ckpt.save(state, {**meta, "iter_state": None})
        record.update(metrics={"val": meta["best"]["val"] if meta["best"] else None},
                      history=meta["history"])
        stop = epoch_callback(dict(meta["history"][-1])) if epoch_callback else None
        if stop:
          status = str(stop)
          break
        if es.patience and meta["bad_epochs"] >= es.patience:
          progress.write(f"early stopping: {es.metric} has not improved by {es.min_delta} "
                         f"for {es.patience} epochs (best {meta['best']['value']:.4f} at epoch "
                         f"{meta['best']['epoch']})")
          status = "early_stopped"
          break
  except BaseException as e:
    progress.close()
    ckpt.wait()
    record.finish("failed", error=f"{type(e).__name__}: {e}")
    writer.close()
    raise
  progress.close()
  ckpt.wait()

  # ---- held-out test on the best-by-validation checkpoint (never used for selection).
  best_ckpt = ckpt.restore_best(state)
  eval_state = jax.device_put(best_ckpt[0] if best_ckpt is not None else state, repl)
  result_metrics, calibration = _final_evaluation(
      eval_state, dataset, spec, config, workdir, eval_steps, tta_eval_steps, data_sharding,
      failures, meta["best"]["val"] if meta["best"] else None)
  if "test" in result_metrics:
    test = result_metrics["test"]
    writer.write_scalars(step, {"test/accuracy": test["accuracy"], "test/loss": test["loss"]})
    log.info("test accuracy %.4f (single view, best checkpoint, step %s)", test["accuracy"],
             meta["best"]["step"] if meta["best"] else step)
  if failures.items:
    dataset.report.setdefault("pipeline_decode_failures", failures.items)
    write_report(dataset, os.path.join(workdir, "data_report.json"))
  writer.close()
  ckpt.close()
  final_status = status if step >= total_steps or status != "completed" else "stopped"
  record.finish(final_status, metrics=result_metrics, best=meta["best"] and {
      k: meta["best"][k] for k in ("step", "epoch", "metric", "value")},
                final_step=step, history=meta["history"],
                last_train=meta.get("last_train"), calibration=calibration)
  return record.data


def _final_evaluation(state, dataset, spec, config, workdir, eval_steps, tta_eval_steps,
                      data_sharding, failures, best_val):
  """Temperature fit on val, then the test split: single view (the served model's figure), and
  with flip TTA as an extra, labelled figure when train.tta_flip asks for it.
  Returns (metrics for run.json, calibration record or None)."""
  metrics: dict[str, Any] = {"val": best_val}
  calibration = None
  has = lambda name: name in dataset.splits and len(dataset.split(name).labels) > 0
  if config.train.calibrate and has("val"):
    from jaxclf import calibration as calib  # numpy + scipy only
    val = evaluate_split(state, dataset.split("val"), spec, config, eval_steps, data_sharding,
                         failures, with_logits=True)
    calibration = calib.calibrate(val["logits"], val["labels"])
    spec = dataclasses.replace(spec, temperature=float(calibration["temperature"]))
    with open(os.path.join(workdir, "preprocessing.json"), "w") as f:
      f.write(spec.to_json())
  if has("test"):
    test = evaluate_split(state, dataset.split("test"), spec, config, eval_steps, data_sharding,
                          failures, with_logits=calibration is not None)
    if calibration is not None:
      logits, labels = test.pop("logits"), test.pop("labels")
      calibration["test_ece_before"] = calib.ece(logits, labels)
      calibration["test_ece_after"] = calib.ece(logits, labels, spec.temperature)
    metrics["test"] = test
    if config.train.tta_flip:
      metrics["test_tta"] = {**evaluate_split(state, dataset.split("test"), spec, config,
                                              tta_eval_steps, data_sharding, failures),
                             "note": "flip TTA (mean of the image and its mirror); the exported "
                                     "model serves a single view: see metrics.test"}
  return metrics, calibration


def _check_finite(m, step):
  loss = float(jax.device_get(m.loss.compute()))
  gn = float(jax.device_get(m.grad_norm.compute()))
  if not (math.isfinite(loss) and math.isfinite(gn)):
    raise NonFiniteError(f"non-finite training loss/gradient at step {step} (loss={loss}, "
                         f"grad_norm={gn}); lower optimizer.learning_rate, set "
                         "optimizer.grad_clip_norm, or check the input data")


def _plateau(state, meta, val_loss, sc, writer, step):
  if meta["plateau_best"] is None or val_loss < meta["plateau_best"]:
    meta["plateau_best"], meta["plateau_bad"] = val_loss, 0
  else:
    meta["plateau_bad"] += 1
    if meta["plateau_bad"] >= sc.plateau_patience:
      state = state.replace(lr_scale=state.lr_scale * sc.plateau_factor)
      meta["plateau_bad"] = 0
      writer.write_scalars(step, {"train/lr_scale": float(state.lr_scale)})
  return state, meta
