"""`jaxclf serve` (the REST gateway under uvicorn) and `jaxclf predict` (offline batch prediction).

  jaxclf serve --model-path exports/cnn --port 8000
  jaxclf serve --backend triton --triton-url localhost:8001 --model fashion_image --model-path exports/cnn
  jaxclf predict --model-path exports/cnn ./incoming/ --out predictions.csv
  jaxclf predict --model-path registry:fashion@production uris.csv --out preds.jsonl
  jaxclf predict --model-path exports/cnn s3://bucket/incoming/ --out preds.csv

`predict` reads images in a thread pool (decode + preprocess, the same code as training), runs
onnxruntime in batches, appends a row per image and flushes after every batch: rerunning the same
command resumes where it stopped. Bad files go to <out>.errors.csv with their reason; they never
stop the run. Module imports stay light so `jaxclf --help` does not load FastAPI/onnxruntime.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import csv
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

CSV_URI_COLUMNS = ("uri", "path", "file", "filename", "url", "image")


# --------------------------------------------------------------------------- serve

def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model-path", help="export dir, .../model.onnx, or registry:NAME@stage|version")
  p.add_argument("--backend", choices=("onnx", "triton"), default=None,
                 help="onnx: onnxruntime in this process (default); triton: a Triton server")
  p.add_argument("--triton-url", default=None, help="host:port (gRPC 8001 / HTTP 8000)")
  p.add_argument("--triton-protocol", choices=("grpc", "http"), default=None)
  p.add_argument("--model", dest="triton_model", default=None,
                 help="Triton model to call: the bytes-in ensemble, e.g. fashion_image")
  p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
  p.add_argument("--port", type=int, default=None, help="default 8000")
  p.add_argument("--no-micro-batching", dest="micro_batching", action="store_false", default=None,
                 help="run every request on its own instead of batching concurrent ones")
  p.add_argument("--max-batch-size", type=int, default=None)
  p.add_argument("--max-wait-ms", type=float, default=None,
                 help="longest a batch is held open for requests already arriving")
  p.add_argument("--no-predict-fast-path", dest="predict_fast_path", action="store_false",
                 default=None, help="serve POST /v1/predict through the FastAPI router instead of "
                 "straight from the gateway middleware (same endpoint; slower)")
  p.add_argument("--inline-decode-pixels", type=int, default=None,
                 help="decode images up to this many pixels on the event loop, bigger ones in "
                 "the thread pool (default 262144; 0 = all in the thread pool)")
  p.add_argument("--gil-switch-interval-ms", type=float, default=None,
                 help="sys.setswitchinterval for the server process (default: Python's 5 ms)")
  p.add_argument("--threads", dest="intra_op_threads", type=int, default=None,
                 help="onnxruntime intra-op threads (default: usable cores - 1)")
  p.add_argument("--workers", type=int, default=None,
                 help="gateway processes on the one port (SO_REUSEPORT), each holding the model; "
                 "/metrics and the drift window are per worker, hot reload is refused (default 1)")
  p.add_argument("--max-upload-bytes", type=int, default=None)
  p.add_argument("--max-pixels", type=int, default=None)
  p.add_argument("--request-timeout-s", type=float, default=None)
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--allow-url-fetch", action="store_true", default=None,
                 help="accept {'url': ...} in /v1/predict/json (with --url-allowlist)")
  p.add_argument("--url-allowlist", default=None,
                 help="comma-separated hosts or scheme://host[:port]/path-prefix entries")
  p.add_argument("--url-allow-private", action="store_true", default=None,
                 help="let URL fetch reach private, loopback and link-local addresses")
  p.add_argument("--url-resolve", default=None,
                 help="comma-separated host=ip pins for URL fetch (like curl --resolve)")
  p.add_argument("--api-keys-file", default=None,
                 help="API keys, one a line: name key [rate_per_s [burst]]")
  p.add_argument("--api-key-rate-per-s", type=float, default=None,
                 help="token bucket for keys without their own rate (default 0 = unlimited)")
  p.add_argument("--api-key-burst", type=int, default=None)
  p.add_argument("--protect-ops", action="store_true", default=None,
                 help="/metrics, /v1/models, /v1/monitoring and /docs need the API key too "
                      "(refused when no API key is configured)")
  p.add_argument("--max-inflight", type=int, default=None,
                 help="predict requests processed at once (default 64)")
  p.add_argument("--max-queue", type=int, default=None,
                 help="predict requests waiting beyond --max-inflight before 429 (default 256)")
  p.add_argument("--shutdown-delay-s", type=float, default=None,
                 help="after SIGTERM: answer 503 (readyz too) this long before closing")
  p.add_argument("--drain-timeout-s", type=float, default=None,
                 help="after SIGTERM: longest wait for in-flight requests (default 30)")
  p.add_argument("--allow-unverified", action="store_true", default=None,
                 help="serve an export whose model.onnx has no recorded sha256")
  p.add_argument("--monitor-window", type=int, default=None)
  p.add_argument("--drift-threshold", type=float, default=None)
  p.add_argument("--no-request-log", dest="log_requests", action="store_false", default=None)
  p.add_argument("--otel-telemetry", action="store_true", default=None,
                 help="keep FastAPI's native OpenTelemetry spans and metrics (they need a "
                 "configured OTel provider; off by default: they cost on every request)")
  p.add_argument("--log-level", default="INFO")
  p.epilog = ("Secrets come from the environment or files only: JAXCLF_SERVE_API_KEY / "
              "JAXCLF_SERVE_API_KEYS (comma-separated) or --api-keys-file (predict endpoints need "
              "X-API-Key), JAXCLF_SERVE_ADMIN_TOKEN (POST /v1/admin/reload). Any setting can be set "
              "as JAXCLF_SERVE_<NAME>; flags win.")


def _settings_from_args(args: argparse.Namespace):
  from serving.settings import ServeSettings, load_settings
  import dataclasses
  names = {f.name for f in dataclasses.fields(ServeSettings)} - {"api_key", "api_keys",
                                                                  "admin_token"}
  overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
  return load_settings(overrides)


def run_serve(args: argparse.Namespace) -> int:
  try:
    settings = _settings_from_args(args)
  except ValueError as e:
    print(f"jaxclf serve: error: {e}", file=sys.stderr)
    return 2
  from serving.auth import load_keys
  from serving.backends import ModelLoadError, load_bundle
  try:
    load_keys(settings)  # a bad keys file stops here, not at the first request
  except ValueError as e:
    print(f"jaxclf serve: error: {e}", file=sys.stderr)
    return 2
  if settings.model_path:  # fail fast on a wrong path, before the server starts
    try:
      if settings.model_path.startswith("models:/"):  # download once, here: the server (and
        import dataclasses  # its workers) load the local, checked copy
        from serving.backends import resolve_model_path
        settings = dataclasses.replace(settings, model_path=resolve_model_path(settings.model_path))
      load_bundle(settings.model_path, allow_unverified=settings.allow_unverified)
    except (ModelLoadError, OSError) as e:
      print(f"jaxclf serve: error: {e}", file=sys.stderr)
      return 2
  elif settings.backend == "onnx":
    print("jaxclf serve: error: --model-path is required (export dir or registry:NAME@stage)",
          file=sys.stderr)
    return 2
  from serving.middleware import configure_json_logging
  from serving.server import run_server, run_workers
  configure_json_logging(args.log_level.upper())
  if settings.workers > 1:
    return run_workers(settings, args.log_level)
  return run_server(settings, args.log_level)


# --------------------------------------------------------------------------- predict

def list_inputs(source: str, opener=None) -> list[str]:
  """A folder (recursive), a CSV of URIs (column uri/path/file/url or the first), an S3 prefix."""
  if source.startswith("s3://"):
    from jaxclf.data.sources.remote import Opener
    opener = opener or Opener()
    root = source.rstrip("/")
    return [f"{root}/{key}" for key, _ in opener.list_s3(source)]
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return found
  if os.path.isfile(path) and path.lower().endswith((".csv", ".tsv", ".txt")):
    return _read_uri_list(path)
  raise FileNotFoundError(f"input {source!r}: not a directory, a .csv/.txt list of URIs, or an "
                          "s3:// prefix")


def _read_uri_list(path: str) -> list[str]:
  from jaxclf.data.sources.remote import join
  with open(path, newline="", encoding="utf-8") as f:
    sample = f.read(4096)
    f.seek(0)
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    rows = list(csv.reader(f, delimiter=delimiter))
  if not rows:
    raise ValueError(f"{path}: empty URI list")
  header = [h.strip().lower() for h in rows[0]]
  col = next((header.index(c) for c in CSV_URI_COLUMNS if c in header), None)
  body = rows[1:] if col is not None else rows  # no known header: first column, every row
  col = col or 0
  uris = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
  if not uris:
    raise ValueError(f"{path}: no URIs found (column one of {', '.join(CSV_URI_COLUMNS)})")
  del sample
  return [join(path, u) for u in uris]


def _done_uris(path: str, fmt: str) -> set[str]:
  """URIs already written by an earlier (maybe killed) run; a torn last line is cut off."""
  if not os.path.exists(path):
    return set()
  with open(path, "rb+") as f:
    data = f.read()
    end = data.rfind(b"\n") + 1
    if end != len(data):
      f.truncate(end)
      data = data[:end]
  text = data.decode("utf-8")
  if fmt == "jsonl":
    done = set()
    for line in text.splitlines():
      try:
        done.add(json.loads(line)["uri"])
      except (ValueError, KeyError, TypeError):
        continue
    return done
  rows = list(csv.reader(text.splitlines()))
  return {r[0] for r in rows[1:] if r}


class _Writer:
  """Appends prediction rows (CSV or JSONL) and error rows; flushes after every batch."""

  def __init__(self, out: str, fmt: str, top_k: int, errors_path: str):
    self.fmt, self.top_k = fmt, top_k
    new = not os.path.exists(out) or os.path.getsize(out) == 0
    self.f = open(out, "a", newline="", encoding="utf-8")
    self.csv = csv.writer(self.f) if fmt == "csv" else None
    if new and self.csv:
      cols = ["uri", "label", "confidence"]
      for i in range(1, top_k + 1):
        cols += [f"label_{i}", f"confidence_{i}"]
      self.csv.writerow(cols)
    new_err = not os.path.exists(errors_path) or os.path.getsize(errors_path) == 0
    self.ef = open(errors_path, "a", newline="", encoding="utf-8")
    self.ecsv = csv.writer(self.ef)
    if new_err:
      self.ecsv.writerow(["uri", "stage", "reason"])

  def prediction(self, uri: str, preds: list[dict[str, Any]]) -> None:
    if self.csv:
      row = [uri, preds[0]["label"], f"{preds[0]['confidence']:.6f}"]
      for p in preds:
        row += [p["label"], f"{p['confidence']:.6f}"]
      self.csv.writerow(row)
    else:
      self.f.write(json.dumps({"uri": uri, "label": preds[0]["label"],
                               "confidence": preds[0]["confidence"], "top_k": preds}) + "\n")

  def error(self, uri: str, stage: str, reason: str) -> None:
    self.ecsv.writerow([uri, stage, reason])

  def flush(self) -> None:
    for f in (self.f, self.ef):
      f.flush()
      os.fsync(f.fileno())

  def close(self) -> None:
    self.f.close()
    self.ef.close()


def _load_one(uri: str, opener, spec, max_pixels: int):
  """uri -> (uri, model input, None) or (uri, None, (stage, reason)). Runs in a worker thread."""
  from jaxclf.data.decode import DecodeError, decode_image
  from jaxclf.data.transforms import preprocess
  data, err = opener.read(uri)
  if data is None:
    return uri, None, ("read", err)
  try:
    img = decode_image(data, spec.channels, max_pixels=max_pixels, target_size=spec.image_size,
                       background=spec.background, source=uri)
  except DecodeError as e:
    return uri, None, (e.stage, e.reason)
  return uri, preprocess(img, spec), None


def _batches(it: Sequence[str], size: int) -> Iterator[list[str]]:
  for i in range(0, len(it), size):
    yield list(it[i:i + size])


def run_predict(args: argparse.Namespace) -> int:
  import numpy as np
  from serving.backends import ModelLoadError, OnnxBackend, load_bundle, softmax
  from jaxclf.data.sources.remote import Opener
  fmt = args.format or ("jsonl" if args.out.lower().endswith((".jsonl", ".ndjson")) else "csv")
  errors_path = args.errors or f"{os.path.splitext(args.out)[0]}.errors.csv"
  try:
    bundle = load_bundle(args.model_path, allow_unverified=args.allow_unverified)
    backend = OnnxBackend(bundle, threads=args.threads or 0, micro_batching=False)
  except (ModelLoadError, OSError) as e:
    print(f"jaxclf predict: error: {e}", file=sys.stderr)
    return 2
  opener = Opener()
  try:
    uris = list_inputs(args.input, opener)
  except (FileNotFoundError, ValueError) as e:
    print(f"jaxclf predict: error: {e}", file=sys.stderr)
    return 2
  if os.path.dirname(args.out):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
  if not args.resume:
    for p in (args.out, errors_path):
      if os.path.exists(p):
        os.remove(p)
  done = _done_uris(args.out, fmt) | (_done_uris(errors_path, "csv") if args.resume else set())
  todo = [u for u in uris if u not in done]
  top_k = min(args.top_k, bundle.num_classes)
  writer = _Writer(args.out, fmt, top_k, errors_path)
  counts = collections.Counter(total=len(uris), already_done=len(uris) - len(todo))
  try:
    from tqdm import tqdm
    bar = tqdm(total=len(uris), initial=len(uris) - len(todo), unit="img",
               disable=args.no_progress or None, file=sys.stderr, desc="predict")
  except ImportError:
    bar = None
  t0 = time.perf_counter()
  workers = args.workers or min(8, (os.cpu_count() or 1) * 2)
  with cf.ThreadPoolExecutor(workers, thread_name_prefix="predict-read") as pool:
    pending = collections.deque()
    batches = _batches(todo, args.batch_size)

    def submit_next() -> None:
      batch = next(batches, None)
      if batch is not None:
        pending.append([pool.submit(_load_one, u, opener, bundle.spec, args.max_pixels)
                        for u in batch])

    submit_next()
    submit_next()  # one batch reading while the previous one runs through the model
    try:
      while pending:
        loaded = [f.result() for f in pending.popleft()]
        submit_next()
        ok = [(u, x) for u, x, err in loaded if err is None]
        for u, _, err in loaded:
          if err is not None:
            writer.error(u, *err)
            counts["failed"] += 1
        if ok:
          probs = softmax(backend.run(np.stack([x for _, x in ok])))
          for (u, _), p in zip(ok, probs):
            order = np.argsort(-p, kind="stable")[:top_k]
            writer.prediction(u, [{"label": bundle.labels[i], "index": int(i),
                                   "confidence": round(float(p[i]), 6)} for i in order])
          counts["predicted"] += len(ok)
        writer.flush()
        if bar is not None:
          bar.update(len(loaded))
    except KeyboardInterrupt:
      print("\njaxclf predict: interrupted; rerun the same command to resume", file=sys.stderr)
      for batch in pending:
        for f in batch:
          f.cancel()
      return 130
    finally:
      writer.close()
      if bar is not None:
        bar.close()
  seconds = time.perf_counter() - t0
  summary = {"total": counts["total"], "predicted": counts["predicted"],
             "failed": counts["failed"], "already_done": counts["already_done"],
             "out": args.out, "errors": errors_path, "seconds": round(seconds, 3),
             "images_per_s": round(counts["predicted"] / seconds, 1) if seconds > 0 else None,
             "model": {"name": bundle.name, "version": bundle.version}}
  print(json.dumps(summary))
  return 0


def _add_predict_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("input", help="a folder of images, a .csv/.txt of URIs (local, https://, s3://), "
                 "or an s3:// prefix")
  p.add_argument("--model-path", required=True,
                 help="export dir, .../model.onnx, or registry:NAME@stage|version")
  p.add_argument("--out", required=True, help="predictions file: .csv or .jsonl")
  p.add_argument("--format", choices=("csv", "jsonl"), default=None, help="default: by --out suffix")
  p.add_argument("--errors", default=None, help="bad files list (default <out>.errors.csv)")
  p.add_argument("--top-k", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--workers", type=int, default=0, help="reader threads (default 2 x cores, max 8)")
  p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: cores)")
  p.add_argument("--max-pixels", type=int, default=64_000_000)
  p.add_argument("--no-resume", dest="resume", action="store_false",
                 help="start over instead of skipping URIs already in --out")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--allow-unverified", action="store_true",
                 help="predict with a model.onnx that has no recorded sha256")


def add_serve_commands(subparsers) -> None:
  """Adds `serve` and `predict` to the `jaxclf` command line (jaxclf/cli.py calls this)."""
  s = subparsers.add_parser("serve", help="REST gateway: FastAPI + onnxruntime or Triton",
                            description="Defaults: serving/settings.py (ServeSettings).")
  _add_serve_arguments(s)
  s.set_defaults(func=run_serve)
  p = subparsers.add_parser("predict", help="offline batch prediction to CSV/JSONL (resumable)")
  _add_predict_arguments(p)
  p.set_defaults(func=run_predict)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m serving.predict_cli serve|predict ...`: the same commands without jaxclf.cli
  (whose other command groups import jax, which the serving image does not have)."""
  parser = argparse.ArgumentParser(prog="jaxclf")
  add_serve_commands(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
