"""One augmented batch per augmentation family, as PNG grids (docs/augment/<family>.png).

  .venv/bin/python scripts/augment_grids.py [--out docs/augment]

Each grid is 8 columns: the first rows are the inputs (8 photos from scikit-image's sample data,
8 tinted Fashion-MNIST images, all at 96 px RGB), the next rows the same batch after the family,
drawn by `TrainInput.preview`: the code path of the TensorBoard image summary, i.e. the jitted
on-device augmentation. For `auto` a third block is the Grain path's output for the same slots
(seed 0, step 3, rows 0..15), which must show the same op per image as the block above it.
The families at timm's recipe settings: RandAugment rand-m9-mstd0.5, Mixup 0.8, CutMix 1.0
(per element, so each row shows its own lambda), Random Erasing with probability 1.
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from PIL import Image
from skimage import data as skdata

from jaxclf.data import autoaugment, transforms
from jaxclf.data.sources.fashion_mnist import load_arrays
from jaxclf.data.types import ArraySource, Split
from jaxclf.train.inputs import TrainInput

SIZE = 96
FAMILIES = {
    "auto": transforms.AugmentSpec(auto="randaugment", auto_magnitude=9, auto_magnitude_std=0.5),
    "mixup": transforms.AugmentSpec(mixup=0.8, mix_mode="elem"),
    "cutmix": transforms.AugmentSpec(cutmix=1.0, mix_mode="elem"),
    "erasing": transforms.AugmentSpec(random_erasing=1.0),
}


def sample_batch() -> np.ndarray:
  photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(),
            skdata.hubble_deep_field(), skdata.immunohistochemistry(),
            skdata.colorwheel()[..., :3], skdata.astronaut()[::-1]]
  imgs = [np.asarray(Image.fromarray(p).resize((SIZE, SIZE), Image.BICUBIC)) for p in photos]
  x, _ = load_arrays(None)["train"]
  rng = np.random.default_rng(0)
  for i in range(8):
    grey = x[i].reshape(x[i].shape[:2])[:, :, None]  # (28, 28) or (28, 28, 1)
    rgb = (grey * rng.uniform(0.4, 1.0, 3)).astype(np.uint8)
    imgs.append(np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.BICUBIC)))
  return np.stack(imgs)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join("docs", "augment"))
  out = p.parse_args().out
  os.makedirs(out, exist_ok=True)
  images = sample_batch()
  labels = np.arange(len(images))
  spec = transforms.PreprocessSpec(image_size=(SIZE, SIZE), channels=3,
                                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  split = Split(ArraySource(images, labels), labels)
  for name, aug in FAMILIES.items():
    train_input = TrainInput(split, spec, aug, len(images), 1, 0, "shuffle", on_device=True)
    rows = [images, train_input.preview({"image": images, "label": labels}, jax.random.key(0), 3)]
    if name == "auto":
      rows.append(np.stack([autoaugment.augment_example(im, aug, spec, 0, 3, i)
                            for i, im in enumerate(images)]))
    path = os.path.join(out, f"{name}.png")
    Image.fromarray(transforms.image_grid(np.concatenate(rows), ncols=8)).save(path)
    print(path)


if __name__ == "__main__":
  main()
