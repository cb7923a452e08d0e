"""A corpus of real image files, made with Pillow, covering what users actually upload.

Every good item is the same picture, four flat quadrants (red | green over blue | white), in
some format and mode, so a test can check decoded pixels with one helper; every bad item says
which decode stage must reject it. Reusable: `items()` gives bytes, `write_corpus(dir)` writes
files, `write_class_folder(root, ...)` builds a class-per-folder tree.
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

H, W = 32, 48  # non-square, so a missed EXIF rotation changes the shape
QUADRANTS = {  # (row slice, col slice) -> RGB
    "top_left": (255, 0, 0), "top_right": (0, 200, 0),
    "bottom_left": (0, 0, 255), "bottom_right": (255, 255, 255),
}


@dataclasses.dataclass
class Item:
  name: str  # file name, extension as a user would have it (sometimes wrong on purpose)
  data: bytes
  # Good items: the decoded (H, W, 3) image must match `reference()` within `tolerance`.
  tolerance: int = 0
  grey: bool = False  # the source is greyscale: compare against the luma reference
  # Bad items: the stage at which decode must reject it ('read', 'header', 'decode', 'limit').
  skip_stage: str | None = None
  format: str | None = None  # the format probe must report

  @property
  def good(self) -> bool:
    return self.skip_stage is None


def reference(h: int = H, w: int = W, shift: int = 0) -> np.ndarray:
  """The canonical picture, uint8 (h, w, 3). `shift` recolours it, to make distinct images."""
  img = np.zeros((h, w, 3), np.uint8)
  img[: h // 2, : w // 2] = QUADRANTS["top_left"]
  img[: h // 2, w // 2:] = QUADRANTS["top_right"]
  img[h // 2:, : w // 2] = QUADRANTS["bottom_left"]
  img[h // 2:, w // 2:] = QUADRANTS["bottom_right"]
  if shift:
    img = ((img.astype(np.int32) + shift * 37) % 256).astype(np.uint8)
  return img


def reference_grey(h: int = H, w: int = W) -> np.ndarray:
  return np.asarray(Image.fromarray(reference(h, w)).convert("L"))[:, :, None]


def quadrant_centres(h: int = H, w: int = W) -> list[tuple[int, int]]:
  return [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def patterned(h: int, w: int, seed: int) -> np.ndarray:
  """A textured image (JPEG-realistic, distinct per seed) for volume tests and benchmarks."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  f = rng.uniform(0.02, 0.15, size=3)
  ph = rng.uniform(0, 6.28, size=3)
  img = np.stack([127 + 100 * np.sin(f[c] * x + ph[c]) * np.cos(f[(c + 1) % 3] * y) for c in range(3)], -1)
  img += rng.normal(0, 8, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def _png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
  """A valid PNG signature + IHDR claiming width x height, with a tiny IDAT: costs nothing to
  send, would cost width*height*3 bytes to decode."""
  def chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
      chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
  """Stored rotated 90 degrees counter-clockwise with EXIF Orientation=6 ("rotate 90 CW to
  view"): decoded correctly it is the canonical picture."""
  stored = Image.fromarray(reference()).transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6
  return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif() -> bytes:
  first = Image.fromarray(reference())
  second = Image.new("RGB", (W, H), (0, 0, 0))
  buf = io.BytesIO()
  first.save(buf, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
  return buf.getvalue()


def _rgba(alpha_bottom_right: int = 0) -> Image.Image:
  """Bottom-right quadrant is transparent black: composited on white it reads white again."""
  arr = np.concatenate([reference(), np.full((H, W, 1), 255, np.uint8)], -1)
  arr[H // 2:, W // 2:] = (0, 0, 0, alpha_bottom_right)
  return Image.fromarray(arr)


def _palette_with_transparency() -> bytes:
  img = Image.fromarray(reference()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
  arr = np.asarray(img).copy()
  idx_white = int(arr[3 * H // 4, 3 * W // 4])
  return encode(img, "PNG", transparency=idx_white)  # the white quadrant becomes transparent


def _png16() -> bytes:
  grey = reference_grey()[:, :, 0].astype(np.uint16) * 257  # exact in 16 bits
  return encode(Image.fromarray(grey), "PNG")  # uint16 -> mode I;16


def items() -> list[Item]:
  ref = Image.fromarray(reference())
  good_jpeg = encode(ref, "JPEG", quality=95)
  good_png = encode(ref, "PNG")
  # Truncation must cut the entropy-coded data, not the header: use a larger textured JPEG.
  big_jpeg = encode(Image.fromarray(patterned(128, 128, 7)), "JPEG", quality=90)
  la = Image.fromarray(reference_grey()[:, :, 0]).convert("LA")
  la_arr = np.asarray(la).copy()
  la_arr[H // 2:, W // 2:] = (0, 0)
  return [
      Item("rgb.jpg", good_jpeg, tolerance=24, format="JPEG"),
      Item("grey.jpg", encode(ref.convert("L"), "JPEG", quality=95), tolerance=24, grey=True,
           format="JPEG"),
      Item("cmyk.jpg", encode(ref.convert("CMYK"), "JPEG", quality=95), tolerance=24, format="JPEG"),
      Item("exif_rotated.jpg", _exif_rotated_jpeg(), tolerance=24, format="JPEG"),
      Item("progressive.jpg", encode(ref, "JPEG", quality=95, progressive=True), tolerance=24,
           format="JPEG"),
      Item("rgb.png", good_png, format="PNG"),
      Item("rgba.png", encode(_rgba(), "PNG"), format="PNG"),
      Item("la.png", encode(Image.fromarray(la_arr), "PNG"), grey=True, format="PNG"),
      Item("palette.png", encode(ref.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
           format="PNG"),
      Item("palette_transparent.png", _palette_with_transparency(), format="PNG"),
      Item("grey16.png", _png16(), grey=True, format="PNG"),
      Item("still.gif", encode(ref.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "GIF"),
           format="GIF"),
      Item("animated.gif", _animated_gif(), format="GIF"),
      Item("rgb.bmp", encode(ref, "BMP"), format="BMP"),
      Item("rgb.tiff", encode(ref, "TIFF"), format="TIFF"),
      Item("cmyk.tif", encode(ref.convert("CMYK"), "TIFF"), format="TIFF"),
      Item("lossless.webp", encode(ref, "WEBP", lossless=True), format="WEBP"),
      Item("lossy.webp", encode(ref, "WEBP", quality=90), tolerance=24, format="WEBP"),
      Item("rgba.webp", encode(_rgba(), "WEBP", lossless=True), format="WEBP"),
      Item("png_named.jpg", good_png, format="PNG"),  # wrong extension: content decides
      Item("no_extension", good_jpeg, tolerance=24, format="JPEG"),
      # Bad files, each with the stage that must reject it.
      Item("empty.jpg", b"", skip_stage="read"),
      Item("notes.jpg", b"these are my holiday notes, not a picture\n" * 4, skip_stage="header"),
      Item("truncated.jpg", big_jpeg[: len(big_jpeg) * 6 // 10], skip_stage="decode"),
      Item("truncated.png", good_png[: len(good_png) // 2], skip_stage="decode"),
      Item("bomb.png", _png_bomb_header(), skip_stage="limit"),  # above Pillow's own refusal
      Item("bomb_80mp.png", _png_bomb_header(10_000, 8_000), skip_stage="limit"),  # above ours only
  ]


def good_items() -> list[Item]:
  return [i for i in items() if i.good]


def bad_items() -> list[Item]:
  return [i for i in items() if not i.good]


def write_corpus(directory: str, which: list[Item] | None = None) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  paths = []
  for item in which if which is not None else items():
    path = os.path.join(directory, item.name)
    with open(path, "wb") as f:
      f.write(item.data)
    paths.append(path)
  return paths


def write_class_folder(root: str, classes: dict[str, int], *, size: tuple[int, int] = (24, 24),
                       fmt: str = "PNG", ext: str = ".png", start_seed: int = 0,
                       nested: bool = False) -> dict[str, list[str]]:
  """root/<class>/<n files>: distinct textured images (so no accidental duplicates).
  `nested` puts every other file one folder deeper."""
  out: dict[str, list[str]] = {}
  seed = start_seed
  for cls, n in classes.items():
    d = os.path.join(root, cls)
    os.makedirs(d, exist_ok=True)
    out[cls] = []
    for i in range(n):
      sub = os.path.join(d, "more") if nested and i % 2 else d
      os.makedirs(sub, exist_ok=True)
      path = os.path.join(sub, f"{cls}_{i:04d}{ext}")
      img = Image.fromarray(patterned(*size, seed))
      with open(path, "wb") as f:
        f.write(encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
      out[cls].append(path)
      seed += 1
  return out
