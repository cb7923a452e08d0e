"""configs/photos.py end to end on a generated RGB folder: Fashion-MNIST images colourised and
upscaled plus skimage.data photos -> `jaxclf data ingest` -> train (cached frozen epoch, then one
unfrozen step) -> ONNX export -> one image served through the gateway.

The test runs the config at 32 px (its defaults, 160 px and the schedule, are validated
separately) so that Lite0's compiles stay small."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxclf.config import load_config, validate
from jaxclf.data import data_cli
from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
from jaxclf.train.loop import train_and_evaluate
from test_served_agreement import gateway_predictions

CLASSES = (0, 1, 7, 8)  # T-shirt/top, Trouser, Sneaker, Bag
PER_CLASS = 12


def write_rgb_folder(root) -> None:
  """PER_CLASS colourised, 3x upscaled Fashion-MNIST images per class, and skimage.data photos
  (RGB, of another size) as a fifth class: a user's mixed folder."""
  from skimage import data as skdata
  x, y = load_arrays(None)["train"]
  rng = np.random.default_rng(0)
  for c in CLASSES:
    d = os.path.join(root, CLASS_NAMES[c].replace("/", "_"))
    os.makedirs(d)
    for i, idx in enumerate(np.flatnonzero(y == c)[:PER_CLASS]):
      tint = rng.uniform(0.4, 1.0, 3)
      rgb = (x[idx][:, :, :1] * tint).astype(np.uint8)
      Image.fromarray(rgb).resize((84, 84), Image.BICUBIC).save(os.path.join(d, f"{i}.png"))
  d = os.path.join(root, "photo")
  os.makedirs(d)
  photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
  for i in range(PER_CLASS):
    img = photos[i % len(photos)]
    s = 64 + 8 * i
    Image.fromarray(img).resize((s, s)).save(os.path.join(d, f"{i}.jpg"), quality=90)


def test_photos_config_defaults_validate():
  for arg in ("", ":size=128", ":size=224"):
    c = load_config(f"{ROOT}/configs/photos.py{arg}", environ={})
    validate(c)
    assert c.data.channels == 3 and c.augment.random_resized_crop and c.augment.saturation > 0
    assert c.model.pretrained == "imagenet" and c.train.freeze_backbone_epochs > 0
    assert c.preprocessing.mean == (127 / 255,) * 3 and c.preprocessing.std == (128 / 255,) * 3
  with pytest.raises(ValueError, match="size=1000"):
    load_config(f"{ROOT}/configs/photos.py:size=1000", environ={})


@pytest.mark.slow  # Lite0 compiles (feature pass, train step, eval, ONNX parity): minutes on CPU
def test_photos_folder_ingest_train_export_serve(tmp_path, capsys):
  folder, data = str(tmp_path / "photos"), str(tmp_path / "data")
  write_rgb_folder(folder)
  assert data_cli.main(["data", "ingest", folder, "--out", data, "--val-fraction", "0.2",
                        "--test-fraction", "0.2"]) == 0
  assert json.loads(capsys.readouterr().out)["records"] == PER_CLASS * (len(CLASSES) + 1)
  config = load_config(f"{ROOT}/configs/photos.py:size=32,source={data}", environ={}, overrides=[
      "train.batch_size=8", "train.freeze_backbone_epochs=1", "train.num_epochs=2",
      "train.max_steps=5", "train.eval_batch_size=16", "train.progress_bar=false",
      "train.calibrate=false", "periodic.checkpoint=5 steps"])
  run = str(tmp_path / "run")
  record = train_and_evaluate(config, run)
  assert record["model"]["pretrained"]["kind"] == "catalogue"
  assert record["model"]["pretrained"]["head"] == "replaced (fresh)"
  assert len(record["model"]["pretrained"]["sha256"]) == 64
  assert record["feature_cache"]["augmented"] is False and record["final_step"] == 5
  with open(os.path.join(run, "preprocessing.json")) as f:
    spec = json.load(f)
  assert spec["channels"] == 3 and spec["image_size"] == [32, 32]

  from jaxclf.export.onnx import export_run
  export = str(tmp_path / "export")
  export_run(run, export, which="latest", parity_count=8, reference_count=16)
  photo = np.asarray(Image.open(os.path.join(folder, "photo", "0.jpg")).convert("RGB"))
  (served,) = gateway_predictions(export, [photo])
  names = [p["label"] for p in served["predictions"]]
  assert sorted(names) == sorted(os.listdir(folder))  # every class folder, best first
  probs = [p["confidence"] for p in served["predictions"]]
  assert abs(sum(probs) - 1) < 1e-4 and probs == sorted(probs, reverse=True)
