"""Classify image files with a Triton server's image ensemble, over HTTP or gRPC (tritonclient).

  python -m serving.triton_client --url localhost:8000 image.png [more.jpg ...]
  python -m serving.triton_client --url localhost:8001 --protocol grpc --model fashion_image *.png
  python -m serving.triton_client ... --probabilities --classification 3   # + Triton class_count

Prints one JSON document: per file the top-k labels and scores (and the full probability vector
with --probabilities), the model version that answered, or the server's error for that file. Exit
status 1 when any file failed. Runs in the serving venv (tritonclient pins numpy < 2).

Each file is its own request by default, so one bad file gets its own error; --batch sends all files
in one request (a bad file then fails the whole batch, as Triton reports per request).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

import numpy as np

OUTPUTS = ("probabilities", "top_labels", "top_scores")


def _modules(protocol: str):
  if protocol == "grpc":
    import tritonclient.grpc as client_mod
  else:
    import tritonclient.http as client_mod
  from tritonclient.utils import InferenceServerException
  return client_mod, InferenceServerException


def make_client(url: str, protocol: str = "http", timeout: float = 60.0):
  """One client per thread: tritonclient.http clients are gevent-based."""
  mod, _ = _modules(protocol)
  url = url.split("://", 1)[-1]
  if protocol == "grpc":
    return mod.InferenceServerClient(url)
  return mod.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)


def classify(client, blobs: Sequence[bytes], *, protocol: str = "http",
             model: str = "fashion_image", version: str = "", class_count: int = 0) -> dict[str, Any]:
  """One inference request holding `blobs` (encoded images). Returns numpy outputs + the model
  version; raises tritonclient's InferenceServerException on a server-side error."""
  mod, _ = _modules(protocol)
  data = np.array([[bytes(b)] for b in blobs], dtype=object)
  inp = mod.InferInput("image", list(data.shape), "BYTES")
  inp.set_data_from_numpy(data)
  outs = []
  for name in OUTPUTS:
    if protocol == "grpc":
      outs.append(mod.InferRequestedOutput(name, class_count=class_count if name == "probabilities" else 0))
    else:
      outs.append(mod.InferRequestedOutput(name, binary_data=True,
                                           class_count=class_count if name == "probabilities" else 0))
  result = client.infer(model, [inp], model_version=version, outputs=outs)
  response = result.get_response()
  model_version = (response.model_version if protocol == "grpc" else response.get("model_version"))
  out = {name: result.as_numpy(name) for name in OUTPUTS}
  out["model_version"] = str(model_version)
  return out


def _decode_labels(arr: np.ndarray) -> list[str]:
  return [x.decode() if isinstance(x, bytes) else str(x) for x in arr]


def summarise(out: dict[str, Any], index: int, *, probabilities: bool, class_count: int) -> dict:
  row: dict[str, Any] = {"model_version": out["model_version"]}
  if class_count:
    # Triton's classification extension: "score:index:label" strings instead of the vector.
    row["classification"] = _decode_labels(out["probabilities"][index])
  else:
    row["top"] = [{"label": lab, "score": float(s)}
                  for lab, s in zip(_decode_labels(out["top_labels"][index]),
                                    out["top_scores"][index])]
    if probabilities:
      row["probabilities"] = [float(p) for p in out["probabilities"][index]]
  return row


def run(files: Sequence[str], *, url: str, protocol: str, model: str, version: str = "",
        batch: bool = False, probabilities: bool = False, class_count: int = 0,
        repeat: int = 1) -> dict[str, Any]:
  _, server_error = _modules(protocol)
  client = make_client(url, protocol)
  blobs = []
  for path in files:
    with open(path, "rb") as f:
      blobs.append(f.read())
  results: list[dict[str, Any]] = []
  latencies = []
  groups = [list(range(len(files)))] if batch else [[i] for i in range(len(files))]
  for _ in range(max(1, repeat)):
    for group in groups:
      t0 = time.perf_counter()
      try:
        out = classify(client, [blobs[i] for i in group], protocol=protocol, model=model,
                       version=version, class_count=class_count)
        latencies.append((time.perf_counter() - t0) * 1e3)
        for j, i in enumerate(group):
          results.append({"file": files[i], **summarise(out, j, probabilities=probabilities,
                                                          class_count=class_count)})
      except server_error as e:
        for i in group:
          results.append({"file": files[i], "error": e.message() if hasattr(e, "message") else str(e),
                          "status": str(e.status()) if hasattr(e, "status") else None})
  return {"url": url, "protocol": protocol, "model": model, "results": results,
          "latency_ms": {"count": len(latencies),
                         "p50": float(np.percentile(latencies, 50)) if latencies else None,
                         "max": float(max(latencies)) if latencies else None}}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m serving.triton_client", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...)")
  p.add_argument("--url", default="localhost:8000", help="host:port (HTTP 8000, gRPC 8001)")
  p.add_argument("--protocol", choices=("http", "grpc"), default="http")
  p.add_argument("--model", default="fashion_image", help="the image ensemble, NAME_image")
  p.add_argument("--model-version", default="", help="pin a version (default: what is served)")
  p.add_argument("--batch", action="store_true", help="all files in one request")
  p.add_argument("--probabilities", action="store_true", help="print the full probability vector")
  p.add_argument("--classification", type=int, default=0, metavar="N",
                 help="use Triton's classification extension: top-N 'score:index:label'")
  p.add_argument("--repeat", type=int, default=1, help="send every request N times")
  args = p.parse_args(argv)
  try:
    report = run(args.files, url=args.url, protocol=args.protocol, model=args.model,
                 version=args.model_version, batch=args.batch, probabilities=args.probabilities,
                 class_count=args.classification, repeat=args.repeat)
  except OSError as e:
    print(json.dumps({"error": str(e)}), file=sys.stderr)
    return 2
  except Exception as e:  # connection refused, unknown model: say so plainly, no traceback
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=sys.stderr)
    return 2
  print(json.dumps(report, indent=1))
  return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
  sys.exit(main())
