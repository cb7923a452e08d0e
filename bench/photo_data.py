"""A 10-class RGB JPEG "product photo" set made reproducibly from Fashion-MNIST.

  python bench/photo_data.py --out data/photos_fmnist_src                 # 300 per class
  python bench/photo_data.py --out /tmp/p --per-class 20 --seed 1         # a tiny one
  jaxclf data ingest data/photos_fmnist_src --out data/photos_fmnist      # then train on it

Each image: one Fashion-MNIST training item (28x28 grey, drawn per class with the seed), its
greyscale taken as shading and its silhouette as an alpha mask; colourised with a random hue
(and saturation and brightness); upscaled bicubic to a random 112-160 px square; pasted at a
random position on a 160x160 background drawn from four kinds (two-colour linear gradient,
smooth colour noise, stripes, checkerboard), plus mild sensor noise; saved as an RGB JPEG,
quality 90, in `OUT/<class>/<class>_<NNNN>.jpg` (class-per-folder, what `jaxclf data ingest`
reads). The card is docs/datasets/photos_fmnist.md.

Deterministic: every random draw comes from numpy's PCG64 seeded with (seed, class, item)
(the item choice from (seed, class)), and Pillow's JPEG encoder with fixed settings is
deterministic, so the same --seed and --per-class give the same bytes (checked by `--check`:
an in-memory second build must hash the same). OUT/.photos_fmnist.json (a dot-file: ingest
ignores it) records the arguments, the source items and a sha256 over all files, so a caller
can reuse an existing build.
No jax import: numpy, Pillow and jaxclf's Fashion-MNIST reader only.
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Fashion-MNIST's classes in label order, as folder names (no '/').
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot"]
SIZE = 160  # the canvas side
OBJECT_PX = (112, 160)  # the upscaled object's side, drawn per image
QUALITY = 90
MARKER = ".photos_fmnist.json"
VERSION = 1  # bump when the recipe changes (callers cache builds by it)


def _hsv(h, s, v) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _smooth_noise(rng, cells: int, channels: int) -> np.ndarray:
  """A (SIZE, SIZE, channels) float field in [0, 1]: a cells x cells random grid, bicubic up."""
  low = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
  planes = [np.asarray(Image.fromarray(low[:, :, c]).resize((SIZE, SIZE), Image.Resampling.BICUBIC),
                       np.float32) / 255.0 for c in range(channels)]
  return np.stack(planes, -1)


def background(rng) -> tuple[np.ndarray, str]:
  """(SIZE, SIZE, 3) float32 in 0-255, and its kind."""
  kind = ("gradient", "noise", "stripes", "checker")[int(rng.integers(4))]
  c1 = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.25, 1.0))
  c2 = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.25, 1.0))
  y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
  if kind == "gradient":
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * x + np.sin(a) * y
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  elif kind == "noise":
    t = _smooth_noise(rng, int(rng.integers(3, 9)), 1)[:, :, 0]
  elif kind == "stripes":
    a, f = rng.uniform(0, np.pi), rng.uniform(3, 14)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * x + np.sin(a) * y) + rng.uniform(0, 6.3))
  else:
    n = int(rng.integers(3, 11))
    t = ((np.floor(x * n) + np.floor(y * n)) % 2).astype(np.float32)
    t = 0.15 + 0.7 * t  # soften: a checker is not pure c1/c2
  img = c1 * (1 - t[..., None]) + c2 * t[..., None]
  if kind != "noise" and rng.random() < 0.5:  # some colour mottling on top
    img += (_smooth_noise(rng, 6, 3) - 0.5) * rng.uniform(20, 60)
  return img, kind


def photo(item: np.ndarray, rng) -> tuple[bytes, dict]:
  """One 28x28 uint8 grey item -> JPEG bytes of a colourised 160 px composite, and its draws."""
  side = int(rng.integers(OBJECT_PX[0], OBJECT_PX[1] + 1))
  top, left = (int(rng.integers(0, SIZE - side + 1)) for _ in range(2))
  grey = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BICUBIC),
                    np.float32) / 255.0
  grey = np.clip(grey, 0.0, 1.0)
  alpha = np.clip((grey - 0.02) / 0.12, 0.0, 1.0)  # the silhouette; soft at the edge
  hue, sat, val = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.55, 1.0)
  colour = _hsv(hue, sat, val)
  shade = 0.25 + 0.75 * grey  # Fashion-MNIST's intensity as the garment's shading
  obj = colour * shade[..., None]
  bg, kind = background(rng)
  canvas = bg.copy()
  region = canvas[top:top + side, left:left + side]
  a = alpha[..., None]
  canvas[top:top + side, left:left + side] = region * (1 - a) + obj * a
  canvas += rng.normal(0.0, rng.uniform(1.0, 6.0), canvas.shape).astype(np.float32)
  out = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(out, "RGB").save(buf, "JPEG", quality=QUALITY, optimize=False, progressive=False,
                                   subsampling=2)
  return buf.getvalue(), {"hue": round(hue, 4), "object_px": side, "background": kind}


def pick_items(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
  """class -> `per_class` distinct Fashion-MNIST train indices, drawn from (seed, class)."""
  out = {}
  for c in range(len(CLASSES)):
    idx = np.flatnonzero(labels == c)
    if per_class > len(idx):
      raise SystemExit(f"--per-class {per_class}: Fashion-MNIST has {len(idx)} of class {c}")
    out[c] = np.sort(np.random.default_rng([seed, 7, c]).choice(idx, per_class, replace=False))
  return out


def build(per_class: int, seed: int):
  """Yields (relative path, JPEG bytes, record) for every image, in a fixed order."""
  from jaxclf.data.sources import fashion_mnist  # noqa: PLC0415 - numpy only
  images, labels = fashion_mnist.load_arrays()["train"]
  for c, idx in pick_items(labels, per_class, seed).items():
    for k, i in enumerate(idx):
      data, draws = photo(images[i, :, :, 0], np.random.default_rng([seed, c, k]))
      yield (f"{CLASSES[c]}/{CLASSES[c]}_{k:04d}.jpg", data,
             {"class": CLASSES[c], "fashion_mnist_train_index": int(i), **draws})


def args_record(per_class: int, seed: int) -> dict:
  return {"recipe": "photos_fmnist", "version": VERSION, "per_class": per_class, "seed": seed,
          "size": SIZE, "quality": QUALITY}


def existing(out: str, per_class: int, seed: int) -> dict | None:
  """The marker of a complete build of these arguments in `out`, else None."""
  try:
    with open(os.path.join(out, MARKER)) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return None
  return m if m.get("args") == args_record(per_class, seed) else None


def make(out: str, per_class: int = 300, seed: int = 0, force: bool = False) -> dict:
  """Builds the folder (or reuses a complete build of the same arguments); -> its marker."""
  if not force and (m := existing(out, per_class, seed)) is not None:
    return m
  t0 = time.time()
  tmp = out.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  digest, n, nbytes, kinds = hashlib.sha256(), 0, 0, {}
  for rel, data, rec in build(per_class, seed):
    path = os.path.join(tmp, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    n, nbytes = n + 1, nbytes + len(data)
    kinds[rec["background"]] = kinds.get(rec["background"], 0) + 1
  marker = {"args": args_record(per_class, seed), "images": n, "classes": CLASSES,
            "bytes": nbytes, "sha256_of_files": digest.hexdigest(), "backgrounds": kinds,
            "source": "Fashion-MNIST train split (Zalando Research, MIT licence)",
            "seconds": round(time.time() - t0, 1)}
  with open(os.path.join(tmp, MARKER), "w") as f:
    json.dump(marker, f, indent=1)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return marker


def digest_only(per_class: int, seed: int) -> str:
  d = hashlib.sha256()
  for rel, data, _ in build(per_class, seed):
    d.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
  return d.hexdigest()


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--per-class", type=int, default=300, help="images per class (default 300)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--force", action="store_true", help="rebuild even if OUT holds this build")
  p.add_argument("--check", action="store_true",
                 help="also rebuild in memory and check the bytes are the same")
  a = p.parse_args()
  m = make(a.out, a.per_class, a.seed, a.force)
  if a.check:
    m = {**m, "rebuild_identical": digest_only(a.per_class, a.seed) == m["sha256_of_files"]}
  print(json.dumps(m, indent=1))


if __name__ == "__main__":
  main()
