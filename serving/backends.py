"""Where logits come from: onnxruntime in-process (with micro-batching) or a Triton server.

Both backends take the same thing, a list of `PreparedImage` (the client's bytes, already
decoded and checked by the gateway, and the model input from jaxclf.data.transforms.preprocess),
and return float32 logits [N, K] in the model's class order. Those logits are already calibrated:
the export bakes the run's temperature (preprocessing.json `temperature`) into the ONNX graph, so
the gateway only takes their softmax and nothing here divides by it again.

  load_bundle(model_path)   export dir | .../model.onnx | registry:NAME@stage  -> ModelBundle
  OnnxBackend(bundle, ...)  InferenceSession, threads fitted to the machine, MicroBatcher in front
  TritonBackend(...)        tritonclient (gRPC or HTTP) to the `<name>_image` ensemble (bytes in)
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxclf.data.transforms import PreprocessSpec
from jaxclf.integrity import IntegrityError, read_verified
from serving.errors import RateLimited

log = logging.getLogger("jaxclf.serving")

EXPORT_FILES = ("model.onnx", "preprocessing.json")  # required; the rest are optional


class ModelLoadError(ValueError):
  """The export cannot be served; the message names the file or field."""


@dataclasses.dataclass
class ModelBundle:
  """Everything the gateway needs to know about one exported model version."""
  name: str
  version: str
  export_dir: str | None
  spec: PreprocessSpec
  labels: list[str]
  sha256: str | None = None
  reference: dict[str, Any] | None = None  # reference_stats.json
  export_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  source_uri: str | None = None
  # model.onnx as read and hashed at load: the backend hands these very bytes to onnxruntime.
  model_bytes: bytes | None = dataclasses.field(default=None, repr=False)

  @property
  def num_classes(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class PreparedImage:
  data: bytes  # what the client sent (Triton preprocesses it itself)
  tensor: np.ndarray | None  # float32 HWC model input (in-process backend)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ModelLoadError(f"{path}: expected a JSON object")
  return value




def resolve_model_path(model_path: str) -> str:
  """registry:NAME@stage -> export dir (through jaxclf.registry); models:/NAME@alias -> a
  downloaded export dir (MLflow's registry); a model.onnx path -> its dir."""
  if model_path.startswith("registry:"):
    try:
      from jaxclf.registry import resolve_model_uri  # lazy: the registry is optional here
    except ImportError as e:
      raise ModelLoadError(f"{model_path}: the model registry is not available ({e})") from None
    try:
      return str(resolve_model_uri(model_path))
    except Exception as e:  # RegistryError, IntegrityError, storage errors: all user-facing
      raise ModelLoadError(f"{model_path}: {e}") from None
  if model_path.startswith("models:/"):  # MLflow's registry: downloaded, sha256-checked
    try:
      from jaxclf.tracking.model_registry import download_model  # lazy: needs mlflow-skinny
    except ImportError as e:
      raise ModelLoadError(f"{model_path}: models:/ URIs need the MLflow client ({e})") from None
    try:
      return download_model(model_path)
    except Exception as e:  # MlflowRegistryError, client errors: one line naming the URI
      raise ModelLoadError(str(e).splitlines()[0] if str(e) else repr(e)) from None
  path = os.path.expanduser(model_path)
  if path.endswith(".onnx"):
    path = os.path.dirname(path) or "."
  return path


def load_bundle(model_path: str, *, allow_unverified: bool = False) -> ModelBundle:
  """Reads an export directory; a clear ModelLoadError names what is missing or wrong. model.onnx
  is read once and checked against its recorded sha256 (jaxclf.integrity)."""
  export_dir = resolve_model_path(model_path)
  if not os.path.isdir(export_dir):
    raise ModelLoadError(f"model path {model_path!r}: {export_dir} is not a directory")
  for name in EXPORT_FILES:
    if not os.path.isfile(os.path.join(export_dir, name)):
      raise ModelLoadError(f"model path {model_path!r}: {name} is missing in {export_dir} "
                           "(an export dir holds model.onnx, preprocessing.json, labels.txt, ...)")
  spec_path = os.path.join(export_dir, "preprocessing.json")
  try:
    spec = PreprocessSpec.from_dict(_read_json(spec_path))
  except (TypeError, ValueError) as e:
    raise ModelLoadError(f"{spec_path}: {e}") from None
  labels = list(spec.class_names)
  labels_path = os.path.join(export_dir, "labels.txt")
  if os.path.isfile(labels_path):
    with open(labels_path, encoding="utf-8") as f:
      file_labels = [line.rstrip("\n") for line in f if line.strip()]
    if labels and file_labels != labels:
      raise ModelLoadError(f"{labels_path}: labels differ from preprocessing.json class_names")
    labels = file_labels
  if not labels:
    raise ModelLoadError(f"{export_dir}: no class names (labels.txt or preprocessing.json "
                         "class_names)")
  meta_path = os.path.join(export_dir, "export.json")
  meta = _read_json(meta_path) if os.path.isfile(meta_path) else {}
  ref_path = os.path.join(export_dir, "reference_stats.json")
  reference = _read_json(ref_path) if os.path.isfile(ref_path) else None
  try:  # a tampered, half-copied or unrecorded model must not serve
    model_bytes, onnx_sha = read_verified(os.path.join(export_dir, "model.onnx"),
                                          allow_unverified=allow_unverified)
  except IntegrityError as e:
    raise ModelLoadError(str(e)) from None
  registry = meta.get("registry") if isinstance(meta.get("registry"), dict) else {}
  version_path = os.path.join(export_dir, "version.json")  # a registry version directory
  if os.path.isfile(version_path):
    registry = {**_read_json(version_path), **registry}
  # A registry version wins; otherwise the artefact hash is the version.
  version = str(registry.get("version") or meta.get("registry_version") or onnx_sha[:12])
  model_meta = meta.get("model") if isinstance(meta.get("model"), dict) else {}
  name = str(registry.get("name") or meta.get("model_name") or model_meta.get("name")
             or os.path.basename(os.path.normpath(export_dir)) or "model")
  return ModelBundle(name=name, version=version, export_dir=export_dir, spec=spec, labels=labels,
                     sha256=onnx_sha, reference=reference, export_meta=meta,
                     source_uri=model_path, model_bytes=model_bytes)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- micro-batching

class MicroBatcher:
  """Merges concurrent requests into one model call. Lives on the event loop; the model runs on
  one worker thread, so the loop never blocks and never contends with a polling thread.

  Continuous batching: while a batch runs, new requests queue; when it finishes, everything queued
  (up to max_batch_size rows) goes as the next batch. An idle model starts at once unless other
  requests are already on their way (`announce()`d when their body arrives, not yet decoded): then
  it holds the batch open for at most max_wait. A lone request therefore never waits, and under
  load batches fill with requests that were in flight anyway.
  """

  def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
               max_wait_s: float = 0.002, on_batch: Callable[[int], None] | None = None):
    self._run = run
    self.max_batch_size = int(max_batch_size)
    self.max_wait_s = float(max_wait_s)
    self._on_batch = on_batch
    self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="model")
    self._pending: list[tuple[np.ndarray, Any]] = []  # (rows, asyncio.Future)
    self._rows = 0
    self._busy = False
    self._announced = 0
    self._timer = None
    self._closed = False
    self.inline_rows = 0  # batches up to this many rows run on the event loop (see calibrate)

  def announce(self) -> None:
    self._announced += 1

  def withdraw(self) -> None:
    """An announced request that now submits, or never will (bad input, timeout)."""
    self._announced = max(0, self._announced - 1)

  async def infer(self, x: np.ndarray) -> np.ndarray:
    """x: model input rows [n, ...] -> model output rows [n, ...]. Call on the event loop."""
    import asyncio
    if self._closed:
      raise RuntimeError("batcher is closed")
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    self._pending.append((x, fut))
    self._rows += len(x)
    if not self._busy:
      if self._rows >= self.max_batch_size or self._announced <= 0 or self.max_wait_s <= 0:
        self._dispatch(loop)
      elif self._timer is None:
        self._timer = loop.call_later(self.max_wait_s, self._on_timer, loop)
    return await fut

  def _on_timer(self, loop) -> None:
    self._timer = None
    if not self._busy and self._pending:
      self._dispatch(loop)

  def _dispatch(self, loop) -> None:
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None
    jobs, rows = [], 0
    while self._pending and (not jobs or rows + len(self._pending[0][0]) <= self.max_batch_size):
      job = self._pending.pop(0)
      jobs.append(job)
      rows += len(job[0])
    self._rows -= rows
    self._busy = True
    x = jobs[0][0] if len(jobs) == 1 else np.concatenate([j[0] for j in jobs])
    if self.inline_rows and len(x) <= self.inline_rows:
      # A model this fast costs less than a thread hand-off (measured at warm-up): run it here.
      done: cf.Future = cf.Future()
      try:
        done.set_result(self._run(x))
      except Exception as e:  # delivered to the waiting requests by _finish
        done.set_exception(e)
      self._finish(loop, jobs, done)
      return
    done = self._executor.submit(self._run, x)
    done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finish, loop, jobs, f))

  def _finish(self, loop, jobs, f: cf.Future) -> None:
    self._busy = False
    error = f.exception()
    if error is None:
      out = f.result()
      if self._on_batch:
        self._on_batch(len(out))
    start = 0
    for x, fut in jobs:
      if not fut.done():  # a request that timed out meanwhile has a cancelled future
        if error is not None:
          fut.set_exception(error)
        else:
          fut.set_result(out[start:start + len(x)])
      start += len(x)
    if self._pending:  # they queued while the model ran: they have waited enough
      self._dispatch(loop)

  def close(self, timeout: float = 5.0) -> None:
    self._closed = True
    self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------- backends

class OnnxBackend:
  """onnxruntime in this process. Thread-safe: session.run releases the GIL."""
  kind = "onnx"
  needs_tensor = True
  remote = False

  def ready(self) -> bool:  # in process: ready once loaded
    return True

  def __init__(self, bundle: ModelBundle, *, threads: int = 0, micro_batching: bool = True,
               max_batch_size: int = 32, max_wait_ms: float = 2.0, inline_budget_us: float = 0.0,
               on_batch: Callable[[int], None] | None = None):
    import onnxruntime as ort  # the edge: only serving imports it
    self.inline_budget_s = inline_budget_us / 1e6
    self.bundle = bundle
    path = os.path.join(bundle.export_dir, "model.onnx")
    opts = ort.SessionOptions()
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else (os.cpu_count() or 1))
    # One intra-op pool sized to the cores; requests are parallel through batching, not through
    # more ORT threads fighting for the same cores.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads spin by default, burning the cores the event loop needs between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # the harmless NCHW/NHWC "MergeShapeInfo" warnings
    # The verified bytes, never the path again: the file may have changed since it was hashed.
    source = bundle.model_bytes if bundle.model_bytes is not None else path
    try:
      self.session = ort.InferenceSession(source, sess_options=opts,
                                          providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
      raise ModelLoadError(f"{path}: onnxruntime cannot load it ({e})") from None
    bundle.model_bytes = None  # onnxruntime holds its own copy now
    inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
    self.input_name = inputs[0].name
    self.output_name = next((o.name for o in outputs if o.name == "logits"), outputs[0].name)
    shape = inputs[0].shape
    want = list(bundle.spec.input_shape)
    if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want)):
      raise ModelLoadError(f"{path}: input {self.input_name} has shape {shape}, preprocessing.json "
                           f"says [N, {', '.join(map(str, want))}]")
    self.threads = threads
    self.on_batch = on_batch
    self.batcher = (MicroBatcher(self.run, max_batch_size, max_wait_ms / 1000.0, on_batch)
                    if micro_batching else None)

  def run(self, x: np.ndarray) -> np.ndarray:
    """float32 NHWC -> logits [N, K]."""
    return self.session.run([self.output_name], {self.input_name: x})[0]

  def infer_sync(self, images: Sequence[PreparedImage]) -> np.ndarray:
    x = np.stack([im.tensor for im in images]).astype(np.float32, copy=False)
    if self.on_batch:
      self.on_batch(len(x))
    return self.run(x)

  def warmup(self, runs: int = 3) -> None:
    x = np.zeros((1, *self.bundle.spec.input_shape), np.float32)
    for _ in range(max(1, runs)):
      out = self.run(x)
    if out.shape != (1, self.bundle.num_classes):
      raise ModelLoadError(f"{self.bundle.export_dir}: model outputs {out.shape[1:]} values, "
                           f"labels.txt has {self.bundle.num_classes} classes")
    if self.batcher is not None:
      self.batcher.inline_rows = self.calibrate_inline(self.inline_budget_s)

  def calibrate_inline(self, budget_s: float) -> int:
    """Largest batch whose median run time fits `budget_s`: such batches run on the event loop,
    because handing them to a thread (wake-up, GIL hand-back) would cost more than the model."""
    if budget_s <= 0:
      return 0
    best, rows = 0, 1
    while rows <= self.batcher.max_batch_size:
      x = np.zeros((rows, *self.bundle.spec.input_shape), np.float32)
      self.run(x)
      times = []
      for _ in range(7):
        t0 = time.perf_counter()
        self.run(x)
        times.append(time.perf_counter() - t0)
      if sorted(times)[3] > budget_s:
        break
      best, rows = rows, rows * 2
    return best

  def close(self) -> None:
    if self.batcher:
      self.batcher.close()


# gRPC's default reconnect backoff grows to 120 s: after a long Triton outage the gateway's
# channels would keep failing for up to two minutes after Triton is back. Capped at 1 s, a channel
# retries its connection at least once a second, so service resumes about a second after Triton.
GRPC_RECONNECT_ARGS = [("grpc.initial_reconnect_backoff_ms", 250),
                       ("grpc.min_reconnect_backoff_ms", 250),
                       ("grpc.max_reconnect_backoff_ms", 1000)]
READY_CACHE_S = 0.5  # /readyz asks Triton at most this often


class BackendUnavailable(RateLimited):
  """The inference server cannot answer now (down, restarting, model loading): 503 + Retry-After.
  Never a 500 and never a guess: the client retries, here or on another instance."""

  def __init__(self, message: str, retry_after_s: float = 1.0):
    super().__init__(retry_after_s, message, code="backend_unavailable", status=503)


class TritonBackend:
  """A Triton ensemble that takes encoded image bytes (`<name>_image`), over gRPC or HTTP.

  The gateway still decodes each image itself (to reject bad input with a 4xx and to measure it for
  drift), but the model input is built inside Triton by the same jaxclf.data.transforms code.
  tritonclient's HTTP client is gevent-based and not thread-safe, so each worker thread gets its own.
  Any failure of the call to Triton (refused, reset, model not loaded) is BackendUnavailable: the
  images were already checked by the gateway, so it is the server side that failed. `ready()` is
  what /readyz reports: false while Triton or the model is not ready.
  """
  kind = "triton"
  needs_tensor = False
  remote = True

  def __init__(self, bundle: ModelBundle | None, *, url: str, model: str, protocol: str = "grpc",
               timeout_s: float = 10.0, input_name: str | None = None,
               output_name: str | None = None, on_batch: Callable[[int], None] | None = None):
    self.url, self.model, self.protocol, self.timeout_s = url, model, protocol, timeout_s
    self.on_batch = on_batch
    self._local = threading.local()
    self._ready_at, self._ready = 0.0, True
    self.batcher = None
    client = self._client()
    try:
      if not client.is_server_live():
        raise ModelLoadError(f"Triton at {url} is not live")
      meta = client.get_model_metadata(model)
    except ModelLoadError:
      raise
    except Exception as e:  # tritonclient raises InferenceServerException or connection errors
      raise ModelLoadError(f"Triton {protocol}://{url}: cannot read model {model!r} ({e})") from None
    meta = self._as_dict(meta)
    self.input_name = input_name or meta["inputs"][0]["name"]
    outputs = [o["name"] for o in meta["outputs"]]
    self.output_name = output_name or next(
        (n for n in ("logits", "probabilities", "probs", "scores") if n in outputs), outputs[0])
    self.output_is_probs = self.output_name != "logits"
    self.model_version = str((meta.get("versions") or ["1"])[-1])
    self.bundle = bundle or self._bundle_from_server(client)

  @staticmethod
  def _as_dict(meta) -> dict[str, Any]:
    if isinstance(meta, dict):
      return meta
    from google.protobuf.json_format import MessageToDict  # gRPC returns a protobuf message
    return MessageToDict(meta, preserving_proto_field_name=True)

  def _client(self):
    client = getattr(self._local, "client", None)
    if client is None:
      if self.protocol == "grpc":
        import tritonclient.grpc as tc
        keepalive = tc.KeepAliveOptions()
        client = tc.InferenceServerClient(self.url, channel_args=[
            ("grpc.max_send_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            *GRPC_RECONNECT_ARGS])
      else:
        import tritonclient.http as tc
        client = tc.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                          network_timeout=self.timeout_s)
      self._local.client = client
    return client

  def _bundle_from_server(self, client) -> ModelBundle:
    """Without an export dir, the class names come from the model config's labels (if any)."""
    raise ModelLoadError(
        f"--backend triton needs --model-path too (the export dir or registry URI of the model "
        f"{self.model!r} serves): the gateway reads class names, preprocessing and drift reference "
        "from it")

  def infer_sync(self, images: Sequence[PreparedImage]) -> np.ndarray:
    if self.protocol == "grpc":
      import tritonclient.grpc as tc
    else:
      import tritonclient.http as tc
    data = np.empty((len(images), 1), dtype=object)
    for i, im in enumerate(images):
      data[i, 0] = im.data
    inp = tc.InferInput(self.input_name, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    out = tc.InferRequestedOutput(self.output_name)
    kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
    try:
      result = self._client().infer(self.model, [inp], outputs=[out], **kwargs)
      values = result.as_numpy(self.output_name)
    except Exception as e:  # InferenceServerException, socket errors (HTTP client): see class doc
      self._ready_at, self._ready = time.monotonic(), False
      raise BackendUnavailable(f"the inference server ({self.protocol}://{self.url}, model "
                               f"{self.model!r}) is unavailable: {_first_line(e)}") from None
    if values is None or values.size == 0 or values.size % len(images):
      raise BackendUnavailable(f"the inference server ({self.protocol}://{self.url}) returned no "
                               f"{self.output_name!r} of the expected shape")
    values = values.astype(np.float32).reshape(len(images), -1)
    if self.on_batch:
      self.on_batch(len(images))
    # The gateway's contract is logits; log-probabilities give the same softmax.
    return np.log(np.clip(values, 1e-12, None)) if self.output_is_probs else values

  def ready(self) -> bool:
    """Triton and the model answer ready (cached READY_CACHE_S; blocking: call from a thread)."""
    now = time.monotonic()
    if now - self._ready_at < READY_CACHE_S:
      return self._ready
    client = self._client()
    kwargs = {"client_timeout": min(2.0, self.timeout_s)} if self.protocol == "grpc" else {}
    try:
      ready = bool(client.is_server_ready(**kwargs) and client.is_model_ready(self.model, **kwargs))
    except Exception:  # refused, reset, timed out: not ready
      ready = False
    self._ready_at, self._ready = time.monotonic(), ready
    return ready

  def warmup(self, runs: int = 1) -> None:
    import io
    from PIL import Image
    h, w, c = self.bundle.spec.input_shape
    buf = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (w, h), 128).save(buf, "PNG")
    for _ in range(max(1, runs)):
      out = self.infer_sync([PreparedImage(buf.getvalue(), None)])
    if out.shape[1] != self.bundle.num_classes:
      raise ModelLoadError(f"Triton model {self.model!r} returns {out.shape[1]} classes, the export "
                           f"has {self.bundle.num_classes}")

  def close(self) -> None:
    client = getattr(self._local, "client", None)
    if client is not None:
      try:
        client.close()
      except Exception:  # closing is best effort
        pass
