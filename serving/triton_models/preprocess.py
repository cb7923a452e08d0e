"""Triton python-backend preprocessing: encoded image bytes -> the classifier's raw pixels, with
the project's own decode + transforms modules (the same code training and evaluation use),
configured by the export's preprocessing.json. Nothing here guesses sizes.

Input `image` BYTES [N, 1] (PNG/JPEG/... file contents). Output `pixels` float32 [N, H, W, C],
0-255, resized and centre-cropped but not normalised: the classifier's graph normalises (Triton's
standard image interface), exactly as `transforms.normalize` would.
A request holding bytes that do not decode gets an error response naming the reason (Triton
returns it to the client as a 400); the other requests of the batch and the server carry on.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from jaxclf.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from jaxclf.data.transforms import PreprocessSpec, resize_and_center_crop


def _error(message):
  try:
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
  except (AttributeError, TypeError):  # older python backends take only the message
    return pb_utils.TritonError(message)


class TritonPythonModel:

  def initialize(self, args):
    config = json.loads(args["model_config"])
    version_dir = os.path.join(args["model_repository"], args["model_version"])
    with open(os.path.join(version_dir, "preprocessing.json"), encoding="utf-8") as f:
      self.spec = PreprocessSpec.from_json(f.read())
    params = config.get("parameters", {})
    (self.output_name,) = [t["name"] for t in config["output"]]
    self.max_pixels = int(params.get("max_pixels", {}).get("string_value", DEFAULT_MAX_PIXELS))

  def execute(self, requests):
    responses = []
    for request in requests:
      blobs = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
      try:
        images = np.stack([self._one(blob, i) for i, blob in enumerate(blobs)])
      except DecodeError as e:
        responses.append(pb_utils.InferenceResponse(error=_error(f"image: {e}")))
        continue
      responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, images)]))
    return responses

  def _one(self, blob, index):
    data = blob if isinstance(blob, bytes) else bytes(blob)
    img = decode_image(data, self.spec.channels, max_pixels=self.max_pixels,
                       target_size=self.spec.image_size, background=self.spec.background,
                       source=f"item {index}")
    return resize_and_center_crop(img, self.spec).astype(np.float32)
