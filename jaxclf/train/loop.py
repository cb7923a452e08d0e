"""train_and_evaluate(config, workdir): the whole training run.

  validate config -> load + check data (errors before any compute) -> model, optimizer, state
  -> resume (latest checkpoint | pretrained | fresh) -> a flat loop of jitted, data-parallel
  steps, each followed by the periodic actions due at it (jaxclf/train/actions.py: log, image
  summary, evaluators, plateau LR, early stopping, checkpoint; rules in config.periodic and
  config.evals) -> the 'end' evaluators on the best checkpoint (test, calibration) -> run.json.
The training core imports no export, serving or tracking-server code.
"""
from __future__ import annotations

import json
import logging
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
from jaxclf.data.dataset import (DataError, class_weights, load_dataset,
                                  split_size_warnings, write_report)
from jaxclf.models.layers import resolve_conv_impl
from jaxclf.models.registry import create_model_from_config
from jaxclf.tracking.run_record import RunRecord
from jaxclf.train import distributed, finetune, inputs, precision, steps, whitening_init
from jaxclf.train import ema as ema_lib
from jaxclf.train.actions import NonFiniteError, check_finite, run_actions
from jaxclf.train.checkpoints import Checkpointer
from jaxclf.train.context import Progress, SilentWriter, TrainRun, unwritten
from jaxclf.train.evaluators import create_evaluators
from jaxclf.train.loop_state import LoopState
from jaxclf.train.optimizers import create_optimizer
from jaxclf.train.schedules import create_learning_rate_fn
from jaxclf.train.state import count_params, create_train_state
from jaxclf.train.writer import MetricWriter

log = logging.getLogger("jaxclf.train")
__all__ = ["NonFiniteError", "create_preprocess_spec", "train_and_evaluate"]


def create_preprocess_spec(config, class_names) -> transforms.PreprocessSpec:
  size = int(config.preprocessing.image_size)
  return transforms.PreprocessSpec(
      image_size=(size, size), channels=int(config.data.channels),
      mean=tuple(config.preprocessing.mean), std=tuple(config.preprocessing.std),
      resize=config.preprocessing.resize, crop_fraction=float(config.preprocessing.crop_fraction),
      class_names=tuple(class_names))



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       epoch_callback=None) -> dict[str, Any]:
  """Trains, evaluates on the held-out test split with the best checkpoint, returns run.json.

  `epoch_callback(entry)`, if given, runs after each validation with that history entry
  (epoch, step, val_loss, val_accuracy, train_loss: validation only, never test). A truthy return
  stops the run with that string as its status (a sweep's pruner returns "pruned")."""
  validate(config)
  # jax.distributed joins the processes before anything starts a JAX backend (a no-op alone).
  distributed.initialize(distributed.Settings.from_config(config.distributed))
  primary = jax.process_index() == 0  # writes run.json, TensorBoard, the progress bar
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  dataset, spec, aug = _load_and_check_data(config, workdir, primary)  # before any compilation
  mesh = Mesh(np.array(jax.devices()), ("data",))  # every process's devices, by process
  steps_per_epoch, total_steps = _steps(config, dataset, mesh.size)

  model = create_model_from_config(config, dataset.num_classes)
  if hasattr(model, "conv_impl"):  # built-ins; a custom model keeps its own convolutions
    model = model.clone(conv_impl=resolve_conv_impl(config.model.conv_impl))
  init_rng, dropout_key, augment_key = jax.random.split(jax.random.key(int(config.seed)), 3)
  ema = ema_lib.EmaSettings.from_config(config)
  state = create_train_state(init_rng, model, spec.input_shape, create_optimizer(config),
                             loss_scale=precision.create_loss_scale(config.model.dtype),
                             ema=ema.enabled)
  repl, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  if jax.process_count() > 1:  # restored straight into global arrays, saved by every process
    state = distributed.replicate(state, repl)
  ckpt = Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
  state, loop_state, resumed_step, pretrained_record = _restore_or_initialise(
      config, ckpt, state, model, dataset, steps_per_epoch, workdir)
  if resumed_step is None and not config.model.pretrained:  # the whitening stem's filters
    state = whitening_init.fit_stem(config, state, dataset.split("train"), spec)
  loop_state.topology = distributed.topology(mesh)
  failures = pipeline.DecodeFailures()
  train_input = _create_train_input(config, dataset.split("train"), spec, aug, steps_per_epoch,
                                    failures)
  lr_fn = create_learning_rate_fn(config, steps_per_epoch,
                                  steps_per_epoch * int(config.train.num_epochs))
  step_args = dict(lr_fn=lr_fn, label_smoothing=float(config.train.label_smoothing),
                   class_weights=jnp.asarray(class_weights(dataset.split("train").labels,
                                                           dataset.num_classes,
                                                           config.train.class_weights)),
                   dropout_key=dropout_key, grad_accum_steps=int(config.train.grad_accum_steps),
                   freeze_backbone_steps=finetune.frozen_steps(config, steps_per_epoch),
                   freeze_batchnorm=bool(config.train.freeze_batchnorm),
                   ema=ema if ema.enabled else None)
  jit_step = partial(jax.jit, in_shardings=(repl, data_sharding), out_shardings=(repl, repl),
                     donate_argnums=(0,))
  train_step = jit_step(partial(steps.train_step, **step_args,
                                prepare=train_input.prepare_fn(augment_key)))
  step = int(jax.device_get(state.step))
  run = TrainRun(
      config=config, workdir=workdir, dataset=dataset, spec=spec,
      state=distributed.replicate(state, repl), loop=loop_state, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, start_step=step, train_input=train_input,
      eval_steps=_create_eval_steps(dataset.num_classes, spec, repl, data_sharding),
      data_sharding=data_sharding, failures=failures, ckpt=ckpt,
      writer=MetricWriter(os.path.join(workdir, "tb")) if primary else SilentWriter(),
      record=RunRecord(workdir) if primary else unwritten(RunRecord(workdir)),
      progress=Progress(bool(config.train.progress_bar), total_steps, step, silent=not primary),
      augment_key=augment_key, epoch_callback=epoch_callback, evals=create_evaluators(config))
  run.record.data["topology"] = loop_state.topology  # processes, devices, mesh
  _start_record(run, model, resumed_step, mesh.size, pretrained_record)
  try:
    _train(run, _create_phases(run, model, train_step, jit_step, step_args))
    metrics, calibration = _final_evaluation(run, repl)
  except BaseException as e:
    try:
      run.record.finish("failed", error=f"{type(e).__name__}: {e}")
    except OSError as unwritten_error:  # a full disk: run.json keeps its last complete version
      log.warning("run.json not updated (%s)", unwritten_error)
    raise
  finally:
    run.progress.close()
    run.writer.close()
    run.ckpt.close()  # waits for the asynchronous saves
  return _finish(run, metrics, calibration)


def _load_and_check_data(config, workdir, write: bool = True):
  """Dataset, preprocessing and augmentation specs; every data problem surfaces here, and the
  run directory gets data_report.json, config.json and preprocessing.json (from process 0)."""
  dataset = load_dataset(config.data)
  for name in ("train", "val"):
    if len(dataset.split(name).labels) == 0:
      raise DataError(f"data.source {config.data.source!r}: the {name} split is empty")
  for warning in split_size_warnings(dataset):
    log.warning("data.source %r: %s", str(config.data.source), warning)
  spec = create_preprocess_spec(config, dataset.class_names)
  if dataset.image_shape and dataset.image_shape[2] not in (1, 3):
    raise DataError(f"images have {dataset.image_shape[2]} channels; expected 1 or 3")
  aug = transforms.AugmentSpec.from_config(config.augment)
  if not write:
    return dataset, spec, aug
  write_report(dataset, os.path.join(workdir, "data_report.json"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=list)
  with open(os.path.join(workdir, "preprocessing.json"), "w") as f:
    f.write(spec.to_json())
  return dataset, spec, aug


def _steps(config, dataset, n_dev: int) -> tuple[int, int]:
  """(steps per epoch, the planned last step: num_epochs worth or train.max_steps)."""
  batch_size = int(config.train.batch_size)
  distributed.check_global_batch(batch_size, n_dev,
                                 grad_accum_steps=int(config.train.grad_accum_steps))
  n_train = len(dataset.split("train").labels)
  steps_per_epoch = n_train // batch_size
  if steps_per_epoch == 0:
    raise DataError(f"train.batch_size={batch_size} is larger than the train split "
                    f"({n_train} images)")
  total = steps_per_epoch * int(config.train.num_epochs)
  return steps_per_epoch, min(total, int(config.train.max_steps) or total)


def _restore_or_initialise(config, ckpt, state, model, dataset, steps_per_epoch, workdir):
  """-> (state, LoopState, resumed step or None, model.pretrained's provenance or None): the
  latest checkpoint (any loop-state version), else model.pretrained's weights
  (jaxclf/train/pretrained_init.py), else the fresh initialisation."""
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    step = int(state.step)
    loop_state = LoopState.from_json(meta, step=step, steps_per_epoch=steps_per_epoch)
    distributed.check_resume_topology(loop_state.topology,
                                      f"{workdir}/checkpoints/latest (step {step})")
    log.info("resuming from %s/checkpoints/latest at step %d", workdir, step)
    return state, loop_state, step, None
  record = None
  if config.model.pretrained:
    from jaxclf.train.pretrained_init import load_pretrained_variables  # only when asked for
    variables, record = load_pretrained_variables(
        config, model, {"params": state.params, "batch_stats": state.batch_stats},
        dataset.class_names)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    if state.ema is not None:  # train.ema averages from the pretrained weights on
      state = ema_lib.start(state)
  return state, LoopState(), None, record


def _create_train_input(config, train_split, spec, aug, steps_per_epoch, failures):
  return inputs.TrainInput(
      train_split, spec, aug, int(config.train.batch_size), steps_per_epoch, int(config.seed),
      config.data.sampler,
      on_device=inputs.use_device_path(config.data.on_device, train_split, spec, aug),
      grain_transform=pipeline.TrainTransform(spec, aug, int(config.data.max_pixels), failures),
      read_threads=int(config.data.read_threads), prefetch=int(config.data.prefetch_batches),
      worker_processes=int(config.data.worker_processes),
      process_index=jax.process_index(), process_count=jax.process_count())


def _create_eval_steps(num_classes, spec, repl, data_sharding) -> dict:
  """{tta_flip: {on_device: jitted eval step}} for uint8 (device) or preprocessed batches."""
  return {tta: {on_device: jax.jit(
      partial(steps.eval_step, num_classes=num_classes, tta_flip=tta,
              prepare=device_augment.make_prepare_fn(spec, None, None) if on_device else None),
      in_shardings=(repl, data_sharding), out_shardings=(repl, repl))
      for on_device in (False, True)} for tta in (False, True)}


def _start_record(run, model, resumed_step, n_dev: int, pretrained=None) -> None:
  config, dataset, ti = run.config, run.dataset, run.train_input
  n_params = count_params(run.state.params)
  conv_impl = getattr(model, "conv_impl", "model's own")
  info = {"name": config.model.name, "params": n_params, "kwargs": dict(config.model.kwargs),
          "conv_impl": conv_impl, "input_path": "on_device" if ti.on_device else "grain"}
  if pretrained is None and resumed_step is not None:  # a resumed segment loads nothing: keep
    pretrained = (run.record.data.get("model") or {}).get("pretrained")  # the first's record
  if pretrained is not None:  # model.pretrained's provenance
    info["pretrained"] = pretrained
  # Which weights every evaluation here (and evaluate, export) runs: "ema" (train.ema) | "trained"
  run.record.data["weights"] = ema_lib.weights_kind(run.state)
  run.record.start(config, dataset.summary(), info, resumed_step)
  if resumed_step is None:
    run.writer.write_hparams({k: v for k, v in run.record.data["config"].items()
                              if not isinstance(v, list)})
  log.info("model %s: %d params, conv %s; %d train / %d val / %d test images; %d steps/epoch on "
           "%d device(s); batches %s; evaluators %s", config.model.name, n_params, conv_impl,
           len(dataset.split("train").labels), len(dataset.split("val").labels),
           len(dataset.splits["test"].labels) if "test" in dataset.splits else 0,
           run.steps_per_epoch, n_dev, "augmented on the device" if ti.on_device
           else "from Grain", ", ".join(f"{n} ({e.when})" for n, e in run.evals.items()))


def _create_phases(run: TrainRun, model, train_step, jit_step, step_args) -> finetune.Phases:
  """The ordinary step, and for train.freeze_backbone_epochs the frozen phase's own jitted step
  on images or (train.cache_frozen_features) on the backbone's cached features."""
  frozen_end = step_args["freeze_backbone_steps"]
  if frozen_end == 0 or run.start_step >= frozen_end:
    return finetune.Phases(train_step)
  c = run.config
  mask = finetune.backbone_mask(c.model.name, run.state.params)
  if not c.train.cache_frozen_features:
    return finetune.Phases(train_step, jit_step(partial(
        steps.train_step, **step_args, prepare=run.train_input.prepare_fn(run.augment_key),
        frozen_backbone=mask)), frozen_end)
  split = run.dataset.split("train")
  features, record = finetune.compute_features(
      run.state, c.model.name, split, run.spec, int(c.train.eval_batch_size),
      int(c.data.max_pixels), int(c.data.read_threads))
  run.record.update(feature_cache=record)
  frozen_step = jit_step(partial(steps.train_step, **step_args, frozen_backbone=mask,
                                 head_forward=finetune.create_head_forward(model, record["head"])))
  batches = finetune.cached_batches(
      features, split.labels, start=run.start_step, end=frozen_end,
      steps_per_epoch=run.steps_per_epoch, batch_size=int(c.train.batch_size), seed=int(c.seed),
      sampler=c.data.sampler)
  return finetune.Phases(train_step, frozen_step, frozen_end, batches)


def _train(run: TrainRun, phases: finetune.Phases) -> None:
  """The flat step loop: one jitted step (the phase's), then every periodic action due at it."""
  start = run.start_step
  run.batches = run.train_input.stream(phases.image_start(start), run.total_steps,
                                       run.loop.iter_epoch, run.loop.iter_state)
  if run.loop.resume_pending:  # a pre-LoopState checkpoint saved before its epoch-end actions
    run_actions(run, start)
  prev = None  # the previous step's metrics: checked for NaN while this step runs
  for step in range(start + 1, run.total_steps + 1):
    train_step, batches = phases.at(step, run.batches)
    t_wait = time.time()
    batch = next(batches)
    wait = time.time() - t_wait
    # With several processes, `batch` is this one's rows: the global batch is built from all.
    run.state, m = train_step(run.state, distributed.assemble(batch, run.data_sharding))
    if prev is not None:
      check_finite(prev, step - 1)  # blocks only on the previous step: the queue stays full
    prev = m
    if "image" in batch:  # the feature cache's batches hold no images
      run.last_batch = batch
    run.window.add(m, wait)
    run.progress.update(1)
    run_actions(run, step)
    if run.stop:
      break
  if prev is not None:
    check_finite(prev, int(jax.device_get(run.state.step)))


def _final_evaluation(run: TrainRun, repl):
  """The when='end' evaluators (test, flip TTA, calibration) on the best-by-validation
  checkpoint (never used for selection). -> (run.json metrics, calibration record or None)."""
  run.progress.close()
  run.ckpt.wait()
  best = run.ckpt.restore_best(run.state)
  state = distributed.replicate(best[0], repl) if best is not None else run.state
  step = int(jax.device_get(run.state.step))
  run.finishing = True
  metrics: dict[str, Any] = {"val": run.loop.best["val"] if run.loop.best else None}
  calibration = None
  for name, evaluator in run.evals.items():
    if evaluator.when == "end":
      out = evaluator(run, state, step)
      if out is not None and evaluator.run_json_key == "calibration":
        calibration = out
      elif out is not None:
        metrics[name] = out
  if "test" in metrics:
    chosen = run.loop.best or {"epoch": run.epoch(step), "step": step}
    log.info("test accuracy %.4f (single view, best checkpoint: epoch %s, step %s)",
             metrics["test"]["accuracy"], chosen["epoch"], chosen["step"])
  return metrics, calibration


def _finish(run: TrainRun, metrics: dict, calibration) -> dict[str, Any]:
  if run.failures.items and jax.process_index() == 0:
    run.dataset.report.setdefault("pipeline_decode_failures", run.failures.items)
    write_report(run.dataset, os.path.join(run.workdir, "data_report.json"))
  step = int(jax.device_get(run.state.step))
  planned = run.steps_per_epoch * int(run.config.train.num_epochs)
  status = run.status if step >= planned or run.status != "completed" else "stopped"
  best = run.loop.best
  run.record.finish(status, metrics=metrics,
                    best=best and {k: best[k] for k in ("step", "epoch", "metric", "value")},
                    final_step=step, history=run.loop.history, last_train=run.loop.last_train,
                    calibration=calibration)
  return run.record.data
