"""Evaluation plots as PNG bytes (matplotlib, Agg), plus a TensorBoard image writer.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly: no
pyplot, so no global figure state, no GUI backend, and safe in threads and headless servers.
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
_MAX_ANNOTATED_CLASSES = 20  # beyond this, cell numbers are unreadable; colours carry it


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _to_png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  return buf.getvalue()


def _short(name: str, n: int = 14) -> str:
  return name if len(name) <= n else name[:n - 1] + "\u2026"


def confusion_matrix_png(counts: Sequence[Sequence[int]], normalized: Sequence[Sequence[float]],
                         class_names: Sequence[str]) -> bytes:
  """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
  counts, norm = np.asarray(counts), np.asarray(normalized, np.float64)
  k = len(class_names)
  side = min(max(5.0, 0.55 * k + 2.5), 24.0)
  fig = _new_figure(side + 1.2, side)
  ax = fig.add_subplot()
  im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="share of true class")
  labels = [_short(c) for c in class_names]
  ax.set_xticks(range(k), labels, rotation=45, ha="right", rotation_mode="anchor")
  ax.set_yticks(range(k), labels)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title("Confusion matrix (colour: row-normalised; numbers: counts)")
  if k <= _MAX_ANNOTATED_CLASSES:
    size = 9 if k <= 10 else 7
    for t in range(k):
      for p in range(k):
        if counts[t, p]:
          ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=size,
                  color="white" if norm[t, p] > 0.5 else "black")
  return _to_png(fig)


def reliability_png(calibration: Mapping[str, Any]) -> bytes:
  """Accuracy against confidence per bin, the diagonal of perfect calibration, and counts."""
  bins = calibration["bins"]
  lower = np.array([b["lower"] for b in bins])
  width = np.array([b["upper"] - b["lower"] for b in bins])
  count = np.array([b["count"] for b in bins])
  acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
  conf = np.array([b["confidence"] if b["confidence"] is not None else 0.0 for b in bins])
  fig = _new_figure(6.0, 6.6)
  ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
  ax.bar(lower, acc, width=width, align="edge", color="#4c78a8", edgecolor="white",
         label="accuracy")
  gap_bottom = np.minimum(acc, conf)
  ax.bar(lower, np.abs(conf - acc) * (count > 0), bottom=gap_bottom, width=width, align="edge",
         color="#e45756", alpha=0.35, edgecolor="#e45756", label="gap to confidence")
  ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
  ax.set_ylim(0, 1)
  ax.set_xlim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(f"Reliability diagram  (ECE {calibration['ece']:.4f}, "
               f"{calibration['n_bins']} bins)")
  ax.legend(loc="upper left")
  ax_n.bar(lower, count, width=width, align="edge", color="#72b7b2", edgecolor="white")
  ax_n.set_yscale("symlog")
  ax_n.set_xlabel("confidence (top-1 probability)")
  ax_n.set_ylabel("examples")
  return _to_png(fig)


def per_class_f1_png(per_class: Sequence[Mapping[str, Any]]) -> bytes:
  """Horizontal bars of F1 per class, best at the top, with precision and recall marked."""
  rows = sorted(per_class, key=lambda c: c["rank"])
  k = len(rows)
  fig = _new_figure(7.5, min(max(3.0, 0.32 * k + 1.2), 30.0))
  ax = fig.add_subplot()
  y = np.arange(k)
  f1 = [c["f1"] for c in rows]
  ax.barh(y, f1, color="#4c78a8", label="F1")
  ax.scatter([c["precision"] for c in rows], y, marker="|", s=120, color="#f58518",
             label="precision", zorder=3)
  ax.scatter([c["recall"] for c in rows], y, marker="x", s=30, color="#54a24b",
             label="recall", zorder=3)
  ax.set_yticks(y, [f"{_short(c['name'], 18)} (n={c['support']})" for c in rows])
  ax.invert_yaxis()
  ax.set_xlim(0, 1.0)
  ax.set_xlabel("score")
  ax.set_title("Per-class F1 (best first)")
  ax.legend(loc="lower right", fontsize=8)
  if k <= 40:  # values at the bar's start, clear of the precision/recall marks at its end
    for yy, v in zip(y, f1):
      inside = v > 0.15
      ax.text(0.01 if inside else v + 0.01, yy, f"{v:.3f}", va="center", ha="left", fontsize=7,
              color="white" if inside else "black")
  return _to_png(fig)


def curves_png(curves: Mapping[str, Any], evaluated_step: int | None = None) -> bytes | None:
  """Loss and accuracy (train and val) and the learning rate over steps; None without data."""
  panels = [("loss", ["train/loss", "val/loss"]), ("accuracy", ["train/accuracy", "val/accuracy"]),
            ("learning rate", ["train/learning_rate"])]
  panels = [(title, [t for t in tags if t in curves and len(curves[t].steps)])
            for title, tags in panels]
  panels = [(title, tags) for title, tags in panels if tags]
  if not panels:
    return None
  fig = _new_figure(5.0 * len(panels), 3.8)
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  style = {"train": dict(color="#4c78a8", lw=1.2), "val": dict(color="#e45756", lw=1.8, marker="o",
                                                                ms=3)}
  for ax, (title, tags) in zip(axes, panels):
    for tag in tags:
      s = curves[tag]
      kw = dict(style[tag.split("/")[0]])
      if len(s.steps) < 30:  # a short run logs few points; a bare line would be invisible
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 3)
      ax.plot(s.steps, s.values, label=tag, **kw)
    if evaluated_step is not None:
      ax.axvline(evaluated_step, color="grey", ls=":", lw=1, label="evaluated checkpoint")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _to_png(fig)


def error_gallery_png(images: Sequence[np.ndarray], captions: Sequence[str], ncols: int = 8
                      ) -> bytes | None:
  """A grid of uint8 HWC images (what the model saw) with 'true / predicted (conf)' captions."""
  if not len(images):
    return None
  n = len(images)
  ncols = min(ncols, n)
  nrows = -(-n // ncols)
  fig = _new_figure(1.7 * ncols, 2.0 * nrows)
  axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
  for ax in axes:
    ax.axis("off")
  for ax, img, cap in zip(axes, images, captions):
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
      ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
      ax.imshow(img)
    ax.set_title(cap, fontsize=7)
  return _to_png(fig)


def write_tensorboard_images(tb_dir: str, images: Mapping[str, bytes | None], step: int = 0) -> None:
  """Writes PNGs as TensorBoard image summaries (tag -> png), already encoded.

  Uses tensorboard's own event writer and protos rather than tensorboardX: tensorboardX imports
  torch whenever it is installed (seconds, and torch must stay out of jaxclf at run time).
  """
  import time

  from PIL import Image
  from tensorboard.compat.proto.event_pb2 import Event
  from tensorboard.compat.proto.summary_pb2 import Summary
  from tensorboard.summary.writer.event_file_writer import EventFileWriter

  writer = EventFileWriter(tb_dir, filename_suffix=".evaluate")
  try:
    for tag, png in images.items():
      if not png:
        continue
      with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
        channels = len(im.getbands())
      image = Summary.Image(height=height, width=width, colorspace=channels,
                            encoded_image_string=png)
      writer.add_event(Event(wall_time=time.time(), step=int(step),
                             summary=Summary(value=[Summary.Value(tag=tag, image=image)])))
  finally:
    writer.close()
