"""TensorBoard writer with clu's MetricWriter method names, over tensorboard's own event writer.

Why not clu.metric_writers: its package __init__ imports TensorFlow (2.3 GB). Why not tensorboardX:
it imports torch whenever torch is installed (the bench extra installs it), costing seconds and
breaking the rule that torch is never imported at run time. tensorboard's EventFileWriter and
Summary protos need neither.
"""
from __future__ import annotations

import io
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _png(image: np.ndarray) -> Summary.Image:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image * 255.0 + 0.5 if image.max() <= 1.0 else image, 0, 255).astype(np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[:, :, 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  h, w = image.shape[:2]
  return Summary.Image(height=h, width=w, colorspace=1 if image.ndim == 2 else image.shape[-1],
                       encoded_image_string=buf.getvalue())


class MetricWriter:
  def __init__(self, logdir: str):
    self._w = EventFileWriter(logdir, flush_secs=10)

  def _add(self, summary: Summary, step: int) -> None:
    self._w.add_event(Event(summary=summary, wall_time=time.time(), step=int(step)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]),
              step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> HWC uint8 (or NHWC: the first is written)."""
    values = []
    for k, v in images.items():
      v = np.asarray(v)
      values.append(Summary.Value(tag=k, image=_png(v[0] if v.ndim == 4 else v)))
    self._add(Summary(value=values), step)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    from tensorboard.plugins.text.summary_v2 import text_pb
    for k, v in texts.items():
      self._add(text_pb(k, v), step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2 as hp
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    # The experiment summary declares the val metrics as the HParams metrics, so the dashboard
    # over a sweep directory shows every trial against validation (never test).
    self._add(hp.hparams_config_pb(
        hparams=[hp.HParam(k) for k in clean],
        metrics=[hp.Metric("val/accuracy", display_name="val accuracy"),
                 hp.Metric("val/loss", display_name="val loss")]), 0)
    self._add(hp.hparams_pb(clean), 0)

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()
