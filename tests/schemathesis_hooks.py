"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): request bodies that carry real images.

Multipart `file` / `files` parts of each declared image content type, and JSON `b64` fields
(OpenAPI format "byte"), are encoded image files (PNG, JPEG, WebP, GIF, BMP, TIFF; random
pixels, 1-300 px a side, grey / colour / alpha / palette), so the decode and inference path is
fuzzed, not only the parsers in front of it.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF",
           "image/bmp": "BMP", "image/tiff": "TIFF"}


def image_files(fmt: str | None = None):
  """Encoded image files of format `fmt` (any of FORMATS when None)."""

  @st.composite
  def build(draw):
    f = fmt or draw(st.sampled_from(sorted(FORMATS.values())))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P"]))
    if f == "JPEG" and mode in ("RGBA", "P"):
      mode = "RGB"
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, f)
    return buf.getvalue()
  return build()


def register() -> None:
  for media_type, fmt in FORMATS.items():
    schemathesis.openapi.media_type(media_type, image_files(fmt))
  schemathesis.openapi.media_type("application/octet-stream", image_files())
  schemathesis.openapi.format("byte", image_files().map(
      lambda data: base64.b64encode(data).decode()))


register()
