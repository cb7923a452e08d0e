"""A generic Triton image-classification client: what Triton's own example client expects of a
model, checked and used, with nothing about this project's models built in.

  python -m serving.triton_image_client --url localhost:8000 --model fashion -c 3 image.png ...
  python -m serving.triton_image_client --url localhost:8001 --protocol grpc --model fashion ...

It holds a model to the contract of triton-inference-server/client's
`src/python/examples/image_client.py` (not shipped in any wheel; this is our own code):
  - read the model metadata and config from the server;
  - exactly one input, with `format` FORMAT_NHWC or FORMAT_NCHW over 3 non-batch dims;
  - exactly one output, FP32, a vector (at most one dim larger than 1);
  - send the image's raw pixels, resized to the input's H x W, greyscale or RGB by the channel
    count, in the input's datatype with no scaling (image_client's `-s NONE`);
  - ask for the top `-c` classes through Triton's classification extension (`class_count`), whose
    answers are "score:index:label" strings (label from the output's label_filename).
A model that breaks a rule is refused with the rule (exit status 2), as image_client refuses it.

Prints one JSON document: the interface it found, and per file the classes. Runs in the serving
venv (tritonclient pins numpy < 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

TRITON_TO_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8,
                   "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}


class ContractError(ValueError):
  """The model does not have the one-input, one-FP32-output image interface."""


def _modules(protocol: str):
  from serving.triton_client import _modules as client_modules  # tritonclient.{http,grpc}
  return client_modules(protocol)[0]


def read_model(client, model: str, version: str = "", protocol: str = "http"
               ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(metadata, config) as plain dicts for either protocol (gRPC's JSON writes int64 as strings
  and leaves out default enum values; both are normalised by `parse_model`)."""
  if protocol == "grpc":
    meta = client.get_model_metadata(model, version, as_json=True)
    config = client.get_model_config(model, version, as_json=True)["config"]
  else:
    meta = client.get_model_metadata(model, version)
    config = client.get_model_config(model, version)
  return meta, config


def parse_model(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
  """The interface image_client needs, or ContractError naming the first rule broken."""
  name = meta.get("name", "?")
  inputs, outputs, config_inputs = meta.get("inputs", []), meta.get("outputs", []), config.get("input", [])
  if len(inputs) != 1:
    raise ContractError(f"model {name!r}: expecting 1 input, got {len(inputs)}")
  if len(outputs) != 1:
    raise ContractError(f"model {name!r}: expecting 1 output, got {len(outputs)}")
  if len(config_inputs) != 1:
    raise ContractError(f"model {name!r}: expecting 1 input in the model configuration, got "
                        f"{len(config_inputs)}")
  inp, out, inp_config = inputs[0], outputs[0], config_inputs[0]
  if out.get("datatype") != "FP32":
    raise ContractError(f"model {name!r}: expecting output datatype FP32, output "
                        f"{out.get('name')!r} is {out.get('datatype')}")
  batched = int(config.get("max_batch_size", 0)) > 0
  out_dims = [int(d) for d in out.get("shape", [])][1 if batched else 0:]
  if sum(1 for d in out_dims if d > 1) > 1:
    raise ContractError(f"model {name!r}: expecting the output to be a vector, got shape {out_dims}")
  in_dims = [int(d) for d in inp.get("shape", [])]
  if len(in_dims) != 3 + batched:
    raise ContractError(f"model {name!r}: expecting input {inp.get('name')!r} to have "
                        f"{3 + batched} dimensions, got {len(in_dims)} ({in_dims})")
  fmt = inp_config.get("format", "FORMAT_NONE")
  if fmt not in ("FORMAT_NHWC", "FORMAT_NCHW"):
    raise ContractError(f"model {name!r}: unexpected input format {fmt}, expecting FORMAT_NCHW "
                        "or FORMAT_NHWC")
  dims = in_dims[1:] if batched else in_dims
  h, w, c = dims if fmt == "FORMAT_NHWC" else (dims[1], dims[2], dims[0])
  if inp.get("datatype") not in TRITON_TO_NUMPY:
    raise ContractError(f"model {name!r}: input datatype {inp.get('datatype')} is not numeric")
  return {"model": name, "max_batch_size": int(config.get("max_batch_size", 0)),
          "input": inp["name"], "output": out["name"], "format": fmt, "height": h, "width": w,
          "channels": c, "datatype": inp["datatype"]}


def image_pixels(path: str, interface: dict[str, Any]) -> np.ndarray:
  """One file -> the input tensor (no batch dim): resized, greyscale/RGB, unscaled."""
  from PIL import Image
  with Image.open(path) as im:
    im = im.convert("L" if interface["channels"] == 1 else "RGB")
    im = im.resize((interface["width"], interface["height"]), Image.Resampling.BILINEAR)
    arr = np.asarray(im).astype(TRITON_TO_NUMPY[interface["datatype"]])
  arr = arr.reshape(interface["height"], interface["width"], interface["channels"])
  return arr.transpose(2, 0, 1) if interface["format"] == "FORMAT_NCHW" else arr


def parse_classes(entries) -> list[dict[str, Any]]:
  """Classification-extension strings "score:index[:label]" -> dicts, best first."""
  out = []
  for e in np.asarray(entries).reshape(-1):
    text = e.decode() if isinstance(e, bytes) else str(e)
    score, index, *label = text.split(":", 2)
    out.append({"score": float(score), "index": int(index), "label": label[0] if label else None})
  return out


def infer_classes(client, interface: dict[str, Any], tensor: np.ndarray, *, class_count: int,
                  protocol: str = "http", version: str = "") -> np.ndarray:
  """One request; the output as the classification extension returns it ("score:index:label")."""
  mod = _modules(protocol)
  inp = mod.InferInput(interface["input"], list(tensor.shape), interface["datatype"])
  inp.set_data_from_numpy(tensor)
  kw = {} if protocol == "grpc" else {"binary_data": True}
  out = mod.InferRequestedOutput(interface["output"], class_count=class_count, **kw)
  result = client.infer(interface["model"], [inp], model_version=version, outputs=[out])
  return result.as_numpy(interface["output"])


def run(files: Sequence[str], *, url: str, protocol: str, model: str, version: str = "",
        class_count: int = 3, batch_size: int = 1) -> dict[str, Any]:
  client = _modules(protocol).InferenceServerClient(url.split("://", 1)[-1])
  interface = parse_model(*read_model(client, model, version, protocol))
  batched = interface["max_batch_size"] > 0
  if not batched:
    batch_size = 1  # a model without batching takes one image per request, no batch dimension
  pixels = [image_pixels(f, interface) for f in files]
  results = []
  for start in range(0, len(files), batch_size):
    chunk = np.stack(pixels[start:start + batch_size])
    rows = infer_classes(client, interface, chunk if batched else chunk[0],
                         class_count=class_count, protocol=protocol, version=version)
    rows = rows if batched else rows[None]
    results += [{"file": f, "classes": parse_classes(r)}
                for f, r in zip(files[start:start + batch_size], rows)]
  return {"url": url, "protocol": protocol, "interface": interface, "results": results}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m serving.triton_image_client", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...)")
  p.add_argument("--url", default="localhost:8000", help="host:port (HTTP 8000, gRPC 8001)")
  p.add_argument("--protocol", "-i", choices=("http", "grpc"), default="http")
  p.add_argument("--model", "-m", required=True)
  p.add_argument("--model-version", "-x", default="")
  p.add_argument("--classes", "-c", type=int, default=1, help="top classes to ask for")
  p.add_argument("--batch-size", "-b", type=int, default=1)
  args = p.parse_args(argv)
  try:
    report = run(args.files, url=args.url, protocol=args.protocol, model=args.model,
                 version=args.model_version, class_count=args.classes, batch_size=args.batch_size)
  except ContractError as e:
    print(json.dumps({"error": str(e), "contract": "image_client"}), file=sys.stderr)
    return 2
  except Exception as e:  # connection refused, unknown model, server error: say so plainly
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=sys.stderr)
    return 1
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
