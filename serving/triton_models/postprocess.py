"""Triton python-backend postprocessing: the classifier's logits -> what the image ensemble
returns. Kept out of `<name>` so that the classifier has Triton's standard one-output interface.

Input `logits` float32 [N, K] (already temperature-scaled by the graph). Outputs, each computed
only when requested: `probabilities` [N, K] (their plain softmax), `top_scores` [N, k],
`top_indices` int32 [N, k], `top_labels` BYTES [N, k]. Ties keep the lower class index first.

Files in the version directory: labels.txt. Config parameter: top_k.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

OUTPUTS = ("probabilities", "top_scores", "top_indices", "top_labels")


class TritonPythonModel:

  def initialize(self, args):
    config = json.loads(args["model_config"])
    version_dir = os.path.join(args["model_repository"], args["model_version"])
    with open(os.path.join(version_dir, "labels.txt"), encoding="utf-8") as f:
      self.labels = np.array([line.rstrip("\n").encode() for line in f if line.strip()],
                             dtype=object)
    top_k = config.get("parameters", {}).get("top_k", {}).get("string_value", "5")
    self.top_k = min(int(top_k), len(self.labels))
    (self.input_name,) = [t["name"] for t in config["input"]]

  def execute(self, requests):
    responses = []
    for request in requests:  # softmax and top-k per request: nothing to gain from concatenating
      logits = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
      wanted = set(request.requested_output_names()) or set(OUTPUTS)
      responses.append(pb_utils.InferenceResponse(self._outputs(logits, wanted)))
    return responses

  def _outputs(self, logits, wanted):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    out = []
    if "probabilities" in wanted:
      out.append(pb_utils.Tensor("probabilities", probs))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :self.top_k]
    if "top_scores" in wanted:
      out.append(pb_utils.Tensor("top_scores", np.take_along_axis(probs, top, axis=1)))
    if "top_indices" in wanted:
      out.append(pb_utils.Tensor("top_indices", top.astype(np.int32)))
    if "top_labels" in wanted:
      out.append(pb_utils.Tensor("top_labels", self.labels[top]))
    return out
