"""The one preprocessing module: training, evaluation, export and every serving path import it.

`PreprocessSpec` is the contract that travels with an exported model (preprocessing.json), so
serving never guesses sizes, channels or normalisation. Everything here is numpy + Pillow on
single uint8 HWC images; nothing imports jax, so Grain workers and the serving image stay light.

  eval/serve:  decode -> `preprocess(img, spec)`          (resize shorter side, centre crop, normalise)
  train:       decode -> `augment(img, rng, spec, aug)`    (random crop/translate, flip, rotate, jitter)
                      -> `normalize(img, spec)`
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from jaxclf.data import autoaugment

SPEC_VERSION = 1

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """How raw pixels become model input. Stored beside every checkpoint and export."""
  image_size: tuple[int, int] = (28, 28)  # (height, width) of the model input
  channels: int = 1
  mean: tuple[float, ...] = (0.2860,)  # in [0, 1] pixel units, one per channel
  std: tuple[float, ...] = (0.3530,)
  resize: str = "bilinear"
  # Eval resizes the shorter side to image_size / crop_fraction, then centre-crops image_size.
  crop_fraction: float = 1.0
  background: int = 255  # transparent pixels are composited on this grey level
  class_names: tuple[str, ...] = ()
  version: int = SPEC_VERSION
  # Temperature scaling of the model's logits (jaxclf.calibration), fitted on the
  # validation split after training. Checkpoints keep raw weights; `load_inference` divides by T
  # and an ONNX export bakes logits / T into its graph, so served logits are already calibrated
  # and nothing downstream divides again. 1.0 = uncalibrated (and every older spec).
  temperature: float = 1.0

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f"preprocessing.channels must be 1 or 3, got {self.channels}")
    if len(self.mean) != self.channels or len(self.std) != self.channels:
      raise ValueError(f"preprocessing.mean/std need {self.channels} values, got "
                       f"{len(self.mean)}/{len(self.std)}")
    if any(s <= 0 for s in self.std):
      raise ValueError("preprocessing.std values must be > 0")
    if self.resize not in _RESAMPLE:
      raise ValueError(f"preprocessing.resize must be one of {sorted(_RESAMPLE)}, got {self.resize!r}")
    if not 0 < self.crop_fraction <= 1:
      raise ValueError(f"preprocessing.crop_fraction must be in (0, 1], got {self.crop_fraction}")
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
      raise ValueError(f"preprocessing.temperature must be a finite number > 0, got {t!r}")
    object.__setattr__(self, "temperature", float(t))

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return (self.image_size[0], self.image_size[1], self.channels)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["image_size"] = list(self.image_size)
    d["mean"], d["std"], d["class_names"] = list(self.mean), list(self.std), list(self.class_names)
    d["layout"] = "NHWC"
    d["dtype"] = "float32"
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    for k in ("image_size", "mean", "std", "class_names"):
      if k in kw:
        kw[k] = tuple(kw[k])
    return cls(**kw)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_json(cls, text: str) -> "PreprocessSpec":
    return cls.from_dict(json.loads(text))


HFLIP_MODES = ("random", "alternate")


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Training-only augmentation; every switch off means `augment` == resize + crop."""
  translate: int = 0  # max pixels of random shift (pad with edge, random crop back)
  random_resized_crop: bool = False
  crop_scale: tuple[float, float] = (0.35, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = False
  # 'random': a fair coin per example and epoch | 'alternate': airbench's derandomised flip,
  # a seeded coin in epoch 0 and the opposite of the previous epoch after (`alternate_hflips`).
  hflip_mode: str = "random"
  vflip: bool = False
  rotation: float = 0.0  # max degrees either way
  brightness: float = 0.0  # multiplicative factor range 1 +- x
  contrast: float = 0.0
  saturation: float = 0.0
  # RandAugment / TrivialAugment (jaxclf/data/autoaugment.py, timm's magnitude scales): the same
  # ops per example on the device and in Grain. '' = off.
  auto: str = ""
  auto_ops: tuple[str, ...] = autoaugment.OPS
  auto_num_ops: int = 2  # RandAugment's N
  auto_magnitude: float = 9.0  # M on timm's 0..10 scale
  auto_magnitude_std: float = 0.5  # timm's mstd; > 100 = uniform in [0, M]
  auto_prob: float = 0.5  # RandAugment: each drawn op applies with this probability
  auto_increasing: bool = True  # timm's inc1
  # Random erasing (timm's --reprob, count 1), on the normalised image: the probability, the
  # erased fraction of the area, the box's aspect ratio range, and 'pixel' (N(0, 1) per pixel
  # and channel in normalised units) or 'const' (0: the mean colour) fill.
  random_erasing: float = 0.0
  erasing_area: tuple[float, float] = (0.02, 1 / 3)
  erasing_ratio: tuple[float, float] = (0.3, 1 / 0.3)
  erasing_mode: str = "pixel"
  # Mixup / CutMix (jaxclf/data/mixing.py), on the whole batch inside the jitted step.
  mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
  cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off
  mix_prob: float = 1.0  # probability that a batch (or element) is mixed at all
  mix_switch_prob: float = 0.5  # with both on: probability of CutMix instead of Mixup
  mix_mode: str = "batch"  # 'batch': one lambda per batch | 'elem': one per example

  def __post_init__(self):
    if self.hflip_mode not in HFLIP_MODES:
      raise ValueError(f"augment.hflip_mode must be one of {list(HFLIP_MODES)}, got "
                       f"{self.hflip_mode!r}")

  @property
  def mixing(self) -> bool:
    return self.mixup > 0 or self.cutmix > 0

  @property
  def alternating_hflip(self) -> bool:
    """Flips come from `alternate_hflips` (the input path supplies them), not from a coin."""
    return self.hflip and self.hflip_mode == "alternate"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "AugmentSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(cfg).items()
          if k in fields}
    return cls(**kw)


def _pil(img: np.ndarray) -> Image.Image:
  return Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


def _np(img: Image.Image, channels: int) -> np.ndarray:
  arr = np.asarray(img, dtype=np.uint8)
  return arr[:, :, None] if arr.ndim == 2 else arr[:, :, :channels]


def match_channels(img: np.ndarray, channels: int) -> np.ndarray:
  """Greyscale <-> RGB so that a dataset of either kind fits the model's channel count."""
  if img.ndim == 2:
    img = img[:, :, None]
  c = img.shape[2]
  if c == channels:
    return img
  if c == 1 and channels == 3:
    return np.repeat(img, 3, axis=2)
  if c == 3 and channels == 1:
    # ITU-R 601 luma, the same weights Pillow's convert('L') uses.
    y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(y + 0.5, 0, 255).astype(np.uint8)[:, :, None]
  if c == 4:
    return match_channels(img[:, :, :3], channels)
  raise ValueError(f"cannot map an image with {c} channels to {channels}")


def resize_and_center_crop(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
  """Deterministic geometry shared by eval and serving: shorter side, then centre crop."""
  img = match_channels(img, spec.channels)
  th, tw = spec.image_size
  h, w = img.shape[:2]
  if (h, w) == (th, tw) and spec.crop_fraction == 1.0:
    return img
  scale = max(th / h, tw / w) / spec.crop_fraction
  nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
  if (nh, nw) != (h, w):
    img = _np(_pil(img).resize((nw, nh), _RESAMPLE[spec.resize]), spec.channels)
  top, left = (nh - th) // 2, (nw - tw) // 2
  return img[top:top + th, left:left + tw]


def normalization_constants(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
  """float32 (mean, scale) per channel in 0-255 pixel units: normalize(x) = (x - mean) * scale.
  The raw-pixel ONNX graph (jaxclf/export/onnx.py) bakes in these very constants, so its first
  two nodes compute what this module computes, to the bit."""
  mean = np.asarray(spec.mean, np.float32) * np.float32(255.0)
  scale = np.float32(1.0) / (np.asarray(spec.std, np.float32) * np.float32(255.0))
  return mean.astype(np.float32), scale.astype(np.float32)


def normalize(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
  """uint8 HWC (or NHWC) -> float32, (x/255 - mean) / std per channel."""
  mean, scale = normalization_constants(spec)
  return (img.astype(np.float32) - mean) * scale


def preprocess(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
  """The eval/serving transform: uint8 HWC of any size -> float32 model input."""
  return normalize(resize_and_center_crop(img, spec), spec)


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
  return np.stack([preprocess(im, spec) for im in images]) if len(images) else np.zeros(
      (0, *spec.input_shape), np.float32)


# ----------------------------------------------------------------------------- augmentation

def _random_resized_crop(img, rng, spec, aug):
  h, w = img.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*aug.crop_scale)
    log_r = rng.uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    ratio = math.exp(log_r)
    cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:  # fall back to a centre crop of the whole image
    ch, cw, top, left = h, w, 0, 0
  th, tw = spec.image_size
  crop = _pil(img).resize((tw, th), _RESAMPLE[spec.resize], box=(left, top, left + cw, top + ch))
  return _np(crop, spec.channels)


def _translate(img, rng, pad):
  h, w = img.shape[:2]
  padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  dy, dx = rng.integers(0, 2 * pad + 1, size=2)
  return padded[dy:dy + h, dx:dx + w]


def _jitter(img, rng, aug):
  x = img.astype(np.float32)
  if aug.brightness:
    x *= rng.uniform(1 - aug.brightness, 1 + aug.brightness)
  if aug.contrast:
    m = x.mean()
    x = (x - m) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + m
  if aug.saturation and x.shape[2] == 3:
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - grey[..., None]) * rng.uniform(1 - aug.saturation, 1 + aug.saturation) + grey[..., None]
  return np.clip(x + 0.5, 0, 255).astype(np.uint8)


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_FLIP_TAG = np.uint64(0x68666C6970)  # keeps the flip coin apart from other uses of the seed


def _mix64(x):
  """splitmix64's finaliser: a bijective, well-mixed hash of uint64s (wraps by design)."""
  x = (x ^ (x >> np.uint64(30))) * _MIX1
  x = (x ^ (x >> np.uint64(27))) * _MIX2
  return x ^ (x >> np.uint64(31))


def alternate_hflips(seed: int, index, epoch: int) -> np.ndarray:
  """augment.hflip_mode=alternate: whether each example (`index`: its index in the training
  split) is flipped in `epoch`. Epoch 0 flips by a coin hashed from (seed, index); each later
  epoch flips exactly the examples the one before did not, so any two consecutive epochs show
  every example once each way. A pure function of its arguments, computed on the host for both
  input paths: they agree, and a resumed run gets the same flips."""
  with np.errstate(over="ignore"):
    key = _mix64(np.asarray([seed % 2**64], np.uint64) ^ _FLIP_TAG)
    coin = _mix64(key ^ np.asarray(index, np.uint64)) >> np.uint64(63)
  return (coin ^ np.uint64(int(epoch) % 2)).astype(bool).reshape(np.shape(index))


def augment(img: np.ndarray, rng: np.random.Generator, spec: PreprocessSpec,
            aug: AugmentSpec, hflip: bool | None = None) -> np.ndarray:
  """The training transform on uint8 HWC; returns uint8 at spec.image_size.

  Deterministic given `rng` (Grain seeds it from the pipeline seed and the record index), which
  is what makes resumed training bit-identical. `hflip`: this example's flip when
  `aug.alternating_hflip` (`alternate_hflips`; the coin is still drawn so that the later draws
  are those of random mode).
  """
  if aug.alternating_hflip and hflip is None:
    raise ValueError("augment.hflip_mode=alternate: the example's flip was not given "
                     "(pipeline.train_dataset tags each record with it)")
  img = match_channels(img, spec.channels)
  if aug.random_resized_crop:
    img = _random_resized_crop(img, rng, spec, aug)
  else:
    img = resize_and_center_crop(img, spec)
  if aug.translate:
    img = _translate(img, rng, aug.translate)
  if aug.rotation:
    angle = float(rng.uniform(-aug.rotation, aug.rotation))
    fill = (int(np.median(img[0])),) * spec.channels  # border colour, not black
    img = _np(_pil(img).rotate(angle, _RESAMPLE["bilinear"], fillcolor=fill if spec.channels > 1
                                else fill[0]), spec.channels)
  if aug.hflip:
    coin = rng.random() < 0.5
    if (hflip if aug.alternating_hflip else coin):
      img = img[:, ::-1]
  if aug.vflip and rng.random() < 0.5:
    img = img[::-1]
  if aug.brightness or aug.contrast or aug.saturation:
    img = _jitter(img, rng, aug)
  return np.ascontiguousarray(img)


ERASE_ATTEMPTS = 10  # timm's RandomErasing tries 10 boxes and erases nothing if none fits


def erase_mask(u, height: int, width: int, aug: AugmentSpec, xp=np):
  """The erased pixels (bool [..., height, width]) from uniforms u [..., ERASE_ATTEMPTS, 4], with
  timm's geometry: area fraction uniform in erasing_area, log-uniform aspect ratio in
  erasing_ratio, box side = round(sqrt(area * ratio)) x round(sqrt(area / ratio)), the first
  attempt that fits strictly inside, at a uniform position. Shared by both input paths."""
  lo, hi = aug.erasing_area
  r0, r1 = math.log(aug.erasing_ratio[0]), math.log(aug.erasing_ratio[1])
  target = (lo + (hi - lo) * u[..., 0]) * (height * width)
  aspect = xp.exp(r0 + (r1 - r0) * u[..., 1])
  eh = xp.floor(xp.sqrt(target * aspect) + 0.5).astype(xp.int32)
  ew = xp.floor(xp.sqrt(target / aspect) + 0.5).astype(xp.int32)
  fits = (eh < height) & (ew < width)
  top = xp.minimum(xp.floor(u[..., 2] * (height - eh + 1)).astype(xp.int32), height - eh)
  left = xp.minimum(xp.floor(u[..., 3] * (width - ew + 1)).astype(xp.int32), width - ew)
  first = xp.argmax(fits, axis=-1)[..., None]
  chosen = (xp.arange(u.shape[-2]) == first) & fits  # none if no attempt fits
  pick = lambda v: xp.sum(xp.where(chosen, v, 0), axis=-1)[..., None, None]
  top, left, eh, ew = pick(top), pick(left), pick(eh), pick(ew)
  yy = xp.arange(height)[:, None]
  xx = xp.arange(width)[None, :]
  return (yy >= top) & (yy < top + eh) & (xx >= left) & (xx < left + ew)


def random_erase(x: np.ndarray, rng: np.random.Generator, aug: AugmentSpec) -> np.ndarray:
  """The Grain path's random erasing of one normalised float32 HWC image."""
  if rng.random() >= aug.random_erasing:
    return x
  mask = erase_mask(rng.random((ERASE_ATTEMPTS, 4)), x.shape[0], x.shape[1], aug)[..., None]
  fill = (rng.standard_normal(x.shape, np.float32) if aug.erasing_mode == "pixel"
          else np.zeros_like(x))
  return np.where(mask, fill, x)


def image_grid(images: np.ndarray, ncols: int = 8) -> np.ndarray:
  """NHWC uint8 -> one HWC uint8 mosaic (for TensorBoard and reports)."""
  n, h, w, c = images.shape
  nrows = -(-n // ncols)
  grid = np.zeros((nrows * (h + 2), ncols * (w + 2), c), np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, ncols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = im
  return grid


def denormalize(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return np.clip((x * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)
