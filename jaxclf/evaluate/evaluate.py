"""`jaxclf evaluate`: score a model on held-out data -> metrics.json, report.html, PNG plots.

  model:  a run directory (Orbax checkpoint: best | latest | step), an ONNX export (the export
          dir or its model.onnx), or `registry:NAME@stage` (resolved by jaxclf.registry).
  data:   'fashion_mnist' (its test split), an ingested dataset (its test split), or a
          class-per-folder directory (every image is test data; with train/ val/ test/ split
          folders, only test/).

Images go through `jaxclf.data.decode.decode_image` and `jaxclf.data.transforms.preprocess`,
the same code as training and serving. Files that cannot be decoded are skipped and listed in
metrics.json and the report; they never end the run.

This module runs an evaluation and writes its outputs, and is the command line; the model is
loaded by model_loader.py, the data by held_out.py, scored by scoring.py (metrics: metrics.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxclf.data import transforms
from jaxclf.data.dataset import DataError
from jaxclf.data.decode import DecodeError
from jaxclf.evaluate.held_out import TestData, load_test_data, model_labels
from jaxclf.evaluate.model_loader import (DEFAULT_BATCH_SIZE, EvaluationError, LoadedModel,
                                          load_model)
from jaxclf.evaluate.schema import SCHEMA_VERSION, validate_metrics
from jaxclf.evaluate.scoring import predict, temperature_scaling, to_pixels

# metrics (scikit-learn), plots (matplotlib), curves (tensorboard) and onnxruntime / jax are
# imported inside the functions that use them: `jaxclf --help` and the other commands, which
# import this module to register `evaluate`, should not pay seconds for them.

GALLERY_SIZE = 16


@dataclasses.dataclass
class Evaluation:
  out_dir: str
  metrics_path: str
  report_path: str
  doc: dict
  # Per-example results behind the figures (not written to disk): the model's logits (already
  # calibrated: raw / temperature), the model-class labels, and each row's position in the full
  # test data (as metrics.json's example indices: unchanged by --max-examples).
  logits: np.ndarray | None = None
  labels: np.ndarray | None = None
  example_index: np.ndarray | None = None


def default_out_dir(model: LoadedModel, data: TestData) -> str:
  tag = f"{data.name}-{data.split}".replace(os.sep, "_")
  if model.run_dir and model.format == "checkpoint":
    return os.path.join(model.run_dir, "eval", f"{model.checkpoint}-step{model.step}-{tag}")
  name = os.path.basename(os.path.dirname(os.path.abspath(model.path))) or "model"
  return os.path.join("eval", f"{name}-{tag}")


def _selection_note(model: LoadedModel) -> str:
  how = (f"The weights were selected by {model.selected_by}"
         if model.selected_by else "The weights were fixed before this evaluation")
  return (f"The test split was never used for model selection or early stopping. {how}; the "
          "figures in this report were computed afterwards, once, on held-out test data. "
          "Validation figures (which did steer training) are reported separately.")


def _gallery(model: LoadedModel, data: TestData, kept: np.ndarray,
             wrong: list[dict]) -> tuple[bytes | None, list[dict]]:
  from jaxclf.evaluate import plots
  images, captions = [], []
  names = model.class_names
  for w in wrong:
    i = int(kept[w["index"]])
    w["index"] = data.original_index(i)  # an index into the full test set, as the schema says
    w["source"] = data.describe(i)
    w["true"], w["predicted"] = names[w["true_index"]], names[w["predicted_index"]]
    try:
      pixels = to_pixels(data.read(i), model.spec, w["source"])
    except (DecodeError, OSError, ValueError):
      continue
    images.append(transforms.resize_and_center_crop(pixels, model.spec))
    captions.append(f"true: {w['true'][:16]}\npred: {w['predicted'][:16]} "
                    f"({100 * w['confidence']:.0f}%)")
  return plots.error_gallery_png(images, captions), wrong


def _write_json(path: str, doc: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _run_data_config(model: LoadedModel):
  """The data section of the model's training run (same split seed and fractions, so an
  ingested or folder dataset yields the same test split it was trained beside), or None."""
  cfg_path = os.path.join(model.run_dir, "config.json") if model.run_dir else ""
  if not os.path.isfile(cfg_path):
    return None
  import ml_collections
  with open(cfg_path) as f:
    return ml_collections.ConfigDict(json.load(f)).get("data")


def _subset(data: TestData, labels: np.ndarray, max_examples: int, seed: int
            ) -> tuple[TestData, np.ndarray]:
  """A seeded random subset (not the first N: folder records are ordered by class)."""
  if not max_examples or len(data) <= max_examples:
    return data, labels
  subset = np.sort(np.random.default_rng(seed).permutation(len(data))[:max_examples])
  read, describe = data.read, data.describe
  data = dataclasses.replace(data, labels=data.labels[subset],
                             read=lambda i: read(subset[int(i)]),
                             describe=lambda i: describe(subset[int(i)]), origin=subset)
  return data, labels[subset]


def _render_plots(model: LoadedModel, data: TestData, kept: np.ndarray, test: dict,
                  run_curves: dict) -> dict[str, bytes | None]:
  from jaxclf.evaluate import plots
  gallery, test["most_confidently_wrong"] = _gallery(model, data, kept,
                                                     test["most_confidently_wrong"])
  cm = test["confusion_matrix"]
  return {
      "confusion_matrix": plots.confusion_matrix_png(cm["counts"], cm["normalized"],
                                                     model.class_names),
      "reliability": plots.reliability_png(test["calibration"]),
      "per_class_f1": plots.per_class_f1_png(test["per_class"]),
      "curves": plots.curves_png(run_curves, model.step),
      "error_gallery": gallery,
  }


def _document(model: LoadedModel, data: TestData, test: dict, val: dict | None,
              skipped: list[dict], renamed: dict[str, str], artifacts: dict[str, str],
              timing: dict[str, float]) -> dict[str, Any]:
  present = {c["index"] for c in test["per_class"] if c["support"] > 0}
  return {
      "schema_version": SCHEMA_VERSION,
      "kind": "jaxclf.evaluation",
      "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "split": "test",
      "model": {"uri": model.uri, "format": model.format, "path": model.path,
                "run_dir": model.run_dir, "checkpoint": model.checkpoint, "step": model.step,
                "architecture": model.architecture, "sha256": model.sha256,
                "input_shape": list(model.spec.input_shape), "class_names": model.class_names},
      "data": {"source": data.source, "kind": data.kind, "name": data.name,
               "version": data.version, "split": data.split,
               "num_examples": test["num_examples"], "class_names": data.class_names,
               "renamed_classes": renamed,
               "classes_without_examples": [c for i, c in enumerate(model.class_names)
                                            if i not in present],
               "skipped": skipped},
      "preprocessing": model.spec.to_dict(),
      "test": test,
      "val": val,
      "model_selection": {"test_used_for_selection": False, "selected_by": model.selected_by,
                          "note": _selection_note(model)},
      "artifacts": artifacts,
      "timing": timing,
  }


def evaluate_model(model_path: str, test_data: str, out_dir: str | None = None, *,
                   which: str | int = "best", batch_size: int = DEFAULT_BATCH_SIZE,
                   max_examples: int = 0, seed: int = 0, bootstrap_resamples: int = 1000,
                   workers: int = 2, tensorboard: bool = True, allow_unverified: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Evaluation:
  """Scores `model_path` on `test_data`; writes metrics.json, report.html, PNG plots and
  TensorBoard images (<out>/tb) to out_dir (default: see `default_out_dir`).

  `max_examples` > 0 scores a seeded random subset (smoke tests); 0 scores everything.
  Raises EvaluationError (model problems) or DataError (data problems) with the file or field.
  """
  from jaxclf.evaluate import curves as curves_lib
  from jaxclf.evaluate import metrics as metrics_lib
  from jaxclf.evaluate import plots, report

  t0 = time.perf_counter()
  model = load_model(model_path, which, batch_size, allow_unverified=allow_unverified)
  data = load_test_data(test_data, _run_data_config(model), workers=workers)
  labels, renamed = model_labels(data, model)
  data, labels = _subset(data, labels, max_examples, seed)

  t_pred = time.perf_counter()
  logits, kept, skipped = predict(model, data, batch_size, workers, progress)
  predict_s = time.perf_counter() - t_pred
  skipped = data.skipped + skipped
  if not len(kept):
    first = "; ".join(f"{s.get('source')}: {s['reason']}" for s in skipped[:3])
    raise DataError(f"--test-data {data.source!r}: none of the {len(data)} images could be "
                    f"decoded ({first})")
  test = metrics_lib.compute_metrics(labels[kept], metrics_lib.softmax(logits),
                                     model.class_names, n_wrong=GALLERY_SIZE, seed=seed,
                                     n_resamples=bootstrap_resamples)
  test["temperature_scaling"] = temperature_scaling(model, labels[kept], logits, test)

  out_dir = os.path.abspath(out_dir or default_out_dir(model, data))
  os.makedirs(out_dir, exist_ok=True)
  run_curves = curves_lib.read_run_curves(model.run_dir) if model.run_dir else {}
  pngs = _render_plots(model, data, kept, test, run_curves)
  artifacts = {"metrics": "metrics.json", "report": "report.html"}
  for key, png in pngs.items():
    if png:
      artifacts[key] = f"{key}.png"
      with open(os.path.join(out_dir, artifacts[key]), "wb") as f:
        f.write(png)
  if tensorboard:
    plots.write_tensorboard_images(
        os.path.join(out_dir, "tb"),
        {f"evaluate/{k}": pngs[k] for k in ("confusion_matrix", "curves", "reliability")},
        step=model.step or 0)
    artifacts["tensorboard"] = "tb"

  timing = {"total_s": round(time.perf_counter() - t0, 3), "predict_s": round(predict_s, 3),
            "images_per_s": round(len(data) / max(predict_s, 1e-9), 1)}
  doc = _document(model, data, test, curves_lib.val_metrics_at(run_curves, model.step),
                  skipped, renamed, artifacts, timing)
  validate_metrics(doc)  # the file we write always matches its published schema
  metrics_path = os.path.join(out_dir, "metrics.json")
  report_path = os.path.join(out_dir, "report.html")
  _write_json(metrics_path, doc)
  report.write_report(report_path, doc, pngs)
  return Evaluation(out_dir, metrics_path, report_path, doc, logits=logits,
                    labels=labels[kept],
                    example_index=np.array([data.original_index(i) for i in kept], np.int64))


# ----------------------------------------------------------------------------- CLI

def _checkpoint_arg(value: str) -> str | int:
  if value in ("best", "latest"):
    return value
  if value.isdigit():
    return int(value)
  raise argparse.ArgumentTypeError(f"--checkpoint must be best, latest or a step number, got {value!r}")


def add_evaluate_command(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "evaluate", help="score a model on held-out data: metrics.json + report.html",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--model-path", required=True,
                 help="run dir, ONNX export dir or model.onnx, or registry:NAME@stage")
  p.add_argument("--test-data", required=True,
                 help="'fashion_mnist', an ingested dataset dir, or a class-per-folder dir")
  p.add_argument("--out", default=None,
                 help="output dir (default: <run>/eval/<ckpt>-step<N>-<data> or ./eval/<export>-<data>)")
  p.add_argument("--checkpoint", type=_checkpoint_arg, default="best",
                 help="best (default) | latest | a step number (run dirs only)")
  p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  p.add_argument("--max-examples", type=int, default=0,
                 help="score a seeded random subset of this size (0 = all)")
  p.add_argument("--seed", type=int, default=0, help="bootstrap and subset seed")
  p.add_argument("--allow-unverified", action="store_true",
                 help="score an ONNX model that has no recorded sha256 (export.json / version.json)")
  p.set_defaults(func=run_evaluate_command)
  return p


def run_evaluate_command(args) -> int:
  def progress(done, total):
    if sys.stderr.isatty():
      print(f"\revaluating {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

  try:
    ev = evaluate_model(args.model_path, args.test_data, args.out, which=args.checkpoint,
                        batch_size=args.batch_size, max_examples=args.max_examples,
                        seed=args.seed, allow_unverified=args.allow_unverified,
                        progress=progress)
  except (EvaluationError, DataError) as e:
    print(f"jaxclf evaluate: error: {e}", file=sys.stderr)
    return 2
  t = ev.doc["test"]
  ci = t["confidence_intervals"]
  print(json.dumps({
      "split": "test", "examples": t["num_examples"], "skipped": len(ev.doc["data"]["skipped"]),
      "accuracy": round(t["accuracy"], 4),
      "accuracy_ci95": [round(ci["accuracy"]["low"], 4), round(ci["accuracy"]["high"], 4)],
      "macro_f1": round(t["macro"]["f1"], 4), "ece": round(t["calibration"]["ece"], 4),
      "ece_before_calibration": round(t["temperature_scaling"]["ece_before"], 4),
      "temperature": t["temperature_scaling"]["temperature"],
      "metrics": ev.metrics_path, "report": ev.report_path}))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxclf.evaluate.evaluate")
  sub = parser.add_subparsers(dest="command", required=True)
  add_evaluate_command(sub)
  args = parser.parse_args(["evaluate", *(sys.argv[1:] if argv is None else argv)])
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
