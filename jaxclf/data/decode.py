"""Decode encoded image bytes into uint8 HWC arrays, or say exactly why not.

Every path that turns bytes into pixels (ingest, training, evaluation, serving) goes through
`decode_image`, so a file that trains is a file that serves. Failures are `DecodeError`s that
carry a stage and a reason; callers at the data edge turn them into reported skips.
"""
from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Anything above this many pixels is refused before the pixel buffer is allocated
# (a 50k x 50k PNG header costs nothing to send and 7.5 GB to decode).
DEFAULT_MAX_PIXELS = 64_000_000
# JPEGs larger than this are decoded downscaled in the codec (draft mode) instead.
DRAFT_THRESHOLD_PIXELS = 16_000_000

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "MPO")


class DecodeError(ValueError):
  """An image that cannot become pixels. `stage` says where it failed."""

  def __init__(self, reason: str, stage: str = "decode", source: str | None = None):
    self.reason = reason
    self.stage = stage
    self.source = source
    where = f"{source}: " if source else ""
    super().__init__(f"{where}{reason} (stage: {stage})")

  def as_dict(self) -> dict:
    return {"source": self.source, "stage": self.stage, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  format: str
  width: int
  height: int
  mode: str


def _background_composite(img: Image.Image, background: int) -> Image.Image:
  """Flattens transparency onto a solid background rather than dropping alpha to black."""
  rgba = img.convert("RGBA")
  bg = Image.new("RGBA", rgba.size, (background, background, background, 255))
  return Image.alpha_composite(bg, rgba)


def _to_mode(img: Image.Image, channels: int, background: int) -> Image.Image:
  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    # 16/32-bit grey: rescale to 8 bits by range instead of clipping everything above 255.
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
    img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    mode = "L"
  elif mode == "F":
    arr = np.asarray(img, dtype=np.float64)
    img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    mode = "L"
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    mode = img.mode
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    img = _background_composite(img, background)
  if channels == 1:
    return img.convert("L")
  return img.convert("RGB")  # handles CMYK, YCbCr, LAB, 1, L


def probe(data: bytes, source: str | None = None) -> ImageInfo:
  """Reads only the header: format and size, without decoding pixels."""
  with open_image(data, source) as img:
    return ImageInfo(img.format or "unknown", img.width, img.height, img.mode)


def open_image(data: bytes, source: str | None = None) -> Image.Image:
  """Opens the bytes, reading only the header (probe's checks and errors); the caller closes it, or
  hands it to decode_image, which decodes it without parsing the header a second time."""
  try:
    return Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    # Pillow refuses to even open headers above 2x its own limit; that is a size verdict.
    raise DecodeError(f"decompression bomb: {e}", "limit", source) from None
  except UnidentifiedImageError:
    # Pillow's message embeds the BytesIO object's address: leave it out so reports are stable.
    raise DecodeError("not a recognised image format", "header", source) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DecodeError(f"not a recognised image ({type(e).__name__}: {e})", "header", source) from None


def decode_image(
    data: bytes | Image.Image,
    channels: int = 3,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: tuple[int, int] | None = None,
    background: int = 255,
    source: str | None = None,
) -> np.ndarray:
  """Bytes -> uint8 array of shape (H, W, channels).

  EXIF orientation is applied, transparency is composited on `background`, palette, CMYK and
  16-bit inputs are converted, animated images give their first frame. `target_size` (h, w) is
  only a hint that lets JPEG decode at a reduced scale when the image is much larger. `data` may
  also be an image from open_image (the gateway checks its header first); it is closed here.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  if isinstance(data, Image.Image):
    img = data
  elif not data:
    raise DecodeError("empty file (0 bytes)", "read", source)
  else:
    try:
      img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
      raise DecodeError(f"decompression bomb: {e}", "limit", source) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise DecodeError(f"not a recognised image ({type(e).__name__})", "header", source) from None
  try:
    w, h = img.size
    if w <= 0 or h <= 0:
      raise DecodeError(f"invalid size {w}x{h}", "header", source)
    if w * h > max_pixels:
      if img.format == "JPEG":
        # Draft mode decodes at 1/2, 1/4 or 1/8 scale inside libjpeg: no full-size buffer.
        # draft() picks the largest reduction whose result is still >= the requested size, so
        # ask for exactly the size at the smallest reduction that fits the limit.
        fits = [s for s in (2, 4, 8) if -(-w // s) * -(-h // s) <= max_pixels]
        if fits:
          img.draft(img.mode, (-(-w // fits[0]), -(-h // fits[0])))
        if img.size[0] * img.size[1] > max_pixels:
          raise DecodeError(f"{w}x{h} = {w*h} pixels exceeds the limit of {max_pixels} even downscaled",
                            "limit", source)
      else:
        raise DecodeError(f"{w}x{h} = {w*h} pixels exceeds the limit of {max_pixels} "
                          "(decompression-bomb guard)", "limit", source)
    elif img.format == "JPEG" and w * h > DRAFT_THRESHOLD_PIXELS:
      want = target_size[::-1] if target_size else (2048, 2048)
      img.draft(img.mode, (max(want[0], 1), max(want[1], 1)))
    if getattr(img, "n_frames", 1) > 1:
      img.seek(0)
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img.load()
      img = ImageOps.exif_transpose(img)
    img = _to_mode(img, channels, background)
    arr = np.asarray(img, dtype=np.uint8)
  except DecodeError:
    raise
  except Image.DecompressionBombError as e:
    raise DecodeError(f"decompression bomb: {e}", "limit", source) from None
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as e:
    raise DecodeError(f"corrupt or truncated image data ({type(e).__name__}: {e})", "decode",
                      source) from None
  finally:
    img.close()
  if arr.ndim == 2:
    arr = arr[:, :, None]
  return np.ascontiguousarray(arr)
