"""TensorBoard writer with clu's MetricWriter method names, over tensorboardX.

`clu.metric_writers` imports TensorFlow (2.3 GB) through its package __init__, so it is not used;
this keeps the same call sites (write_scalars / write_images / write_hparams) without it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  def __init__(self, logdir: str):
    self._w = SummaryWriter(logdir, flush_secs=10)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for k, v in scalars.items():
      self._w.add_scalar(k, float(v), int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> HWC uint8 (or NHWC: the first is written)."""
    for k, v in images.items():
      v = np.asarray(v)
      if v.ndim == 4:
        v = v[0]
      if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
      self._w.add_image(k, v, int(step), dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    self._w.add_hparams(clean, dict(metrics or {}), name="hparams")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      self._w.add_text(k, v, int(step))

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()
