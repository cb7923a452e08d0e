"""Triton python-backend classifier: the CPU twin of `<name>_onnx`, running the exported
model.onnx with onnxruntime inside the python stub (the pytriton-bundled server has no
onnxruntime backend).

Input `images` float32 [N, H, W, C] (preprocessed). Outputs, each computed only when requested:
`logits` [N, K], `probabilities` [N, K] (softmax), `top_scores` [N, k], `top_indices` int32 [N, k],
`top_labels` BYTES [N, k]. Dynamic batching hands `execute` several requests: they are
concatenated into one onnxruntime call and split back. The graph's logits already include the
run's temperature scaling (export bakes logits / T in), so `probabilities` is their plain softmax.

Files in the version directory: model.onnx, labels.txt, integrity.json (the sha256 the export
recorded for model.onnx). At initialize model.onnx is read once, hashed and compared with it, and
those same bytes go to onnxruntime: a tampered copy fails to load, naming the file.
Config parameters: top_k, intra_op_threads (0 = onnxruntime's default).
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from jaxclf.integrity import read_verified

OUTPUTS = ("logits", "probabilities", "top_scores", "top_indices", "top_labels")


def _param(config, key, default):
  return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:

  def initialize(self, args):
    config = json.loads(args["model_config"])
    version_dir = os.path.join(args["model_repository"], args["model_version"])
    opts = ort.SessionOptions()
    threads = int(_param(config, "intra_op_threads", "0"))
    if threads:
      opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Raises IntegrityError naming the file: Triton marks the model UNAVAILABLE with that reason.
    model_bytes, _ = read_verified(os.path.join(version_dir, "model.onnx"))
    self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    with open(os.path.join(version_dir, "labels.txt"), encoding="utf-8") as f:
      self.labels = np.array([line.rstrip("\n").encode() for line in f if line.strip()],
                             dtype=object)
    self.top_k = min(int(_param(config, "top_k", "5")), len(self.labels))
    self.input_name = self.session.get_inputs()[0].name
    self.output_name = self.session.get_outputs()[0].name

  def execute(self, requests):
    batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
    logits = self.session.run([self.output_name],
                              {self.input_name: np.concatenate(batches).astype(np.float32,
                                                                               copy=False)})[0]
    responses, start = [], 0
    for request, batch in zip(requests, batches):
      part = logits[start:start + len(batch)]
      start += len(batch)
      wanted = set(request.requested_output_names()) or set(OUTPUTS)
      responses.append(pb_utils.InferenceResponse(self._outputs(part, wanted)))
    return responses

  def _outputs(self, logits, wanted):
    out = []
    if "logits" in wanted:
      out.append(pb_utils.Tensor("logits", logits))
    if wanted & {"probabilities", "top_scores", "top_indices", "top_labels"}:
      z = np.exp(logits - logits.max(axis=1, keepdims=True))
      probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
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
