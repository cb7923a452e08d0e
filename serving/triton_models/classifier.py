"""Triton python-backend classifier: the CPU twin of `<name>_onnx`, running the export's
model_raw.onnx with onnxruntime inside the python stub (the pytriton-bundled server has no
onnxruntime backend).

Triton's standard image interface, the same as `<name>_onnx`: ONE input `pixels` float32
[N, H, W, C] (`format: FORMAT_NHWC`), raw 0-255 pixels after resize and centre crop (the graph's
first nodes normalise), and ONE output `logits` float32 [N, K] with labels.txt (so Triton's
classification extension answers `class_count`). The logits already include the run's
temperature scaling. Probabilities and top-k live in `<name>_postprocess`. Dynamic batching hands
`execute` several requests: they are concatenated into one onnxruntime call and split back.

Files in the version directory: model_raw.onnx, integrity.json (the sha256 the export recorded
for it). At initialize the file is read once, hashed and compared with it, and those same bytes
go to onnxruntime: a tampered copy fails to load, naming the file.
Config parameters: intra_op_threads (0 = onnxruntime's default).
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from jaxclf.artifacts import RAW_MODEL_FILE
from jaxclf.integrity import read_verified


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
    model_bytes, _ = read_verified(os.path.join(version_dir, RAW_MODEL_FILE))
    self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    (self.input_name,) = [t["name"] for t in config["input"]]
    (self.output_name,) = [t["name"] for t in config["output"]]
    graph = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
    if graph != ([self.input_name], [self.output_name]):
      raise ValueError(f"{RAW_MODEL_FILE} has inputs/outputs {graph}, the config declares "
                       f"{self.input_name!r} -> {self.output_name!r}: not the raw-pixel graph")

  def execute(self, requests):
    batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
    logits = self.session.run([self.output_name],
                              {self.input_name: np.concatenate(batches).astype(np.float32,
                                                                               copy=False)})[0]
    responses, start = [], 0
    for batch in batches:
      part = logits[start:start + len(batch)]
      start += len(batch)
      responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, part)]))
    return responses
