"""Load test of the REST gateway with a real load generator (wrk) on 127.0.0.1 -> JSON.

  python bench/serve.py                       # builds a cnn export, runs every phase
  python bench/serve.py --model-path exports/cnn --duration 10 --out bench/results/serve.json

Every phase posts the same 28x28 PNG (a Fashion-MNIST test image) as multipart to /v1/predict:
  baseline_in_process      decode + preprocess + onnxruntime in this process, no HTTP (the floor)
  embedded_batching        `jaxclf serve` (onnxruntime in-process), micro-batching on: c=1 and c=16
  embedded_no_batching     the same with --no-micro-batching
  triton                   `jaxclf serve --backend triton` -> tritonserver's fashion_image ensemble
                           (gRPC), when the serving venv exists (scripts/setup_serving_env.sh)
Each wrk run is bounded by time (--duration) and by count (--max-requests per connection thread,
enforced in the Lua script), and wrk itself has a hard timeout. Goals (issue #6): embedded p99 at
c=1 <= 5 ms; >= 1,500 images/s at c=16 with micro-batching.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"
wrk.body = %(body)s
local max_requests = %(max_requests)d
local count = 0
response = function(status, headers, body)
  count = count + 1
  if count >= max_requests then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"errors":{"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d},"latency_us":{"p50":%%d,"p90":%%d,"p99":%%d,"p999":%%d,' ..
    '"max":%%d,"mean":%%.1f}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def make_export(arch: str, out_dir: Path) -> Path:
  """An export of an initialised (untrained) model: serving speed does not depend on accuracy."""
  import jax
  import jax.numpy as jnp
  from jaxclf.data.sources.fashion_mnist import CLASS_NAMES, load_arrays
  from jaxclf.data.transforms import PreprocessSpec
  from jaxclf.export.onnx import export_model
  from jaxclf.models import create_model
  x, _ = load_arrays()["train"]
  model = create_model(arch, 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
  export_model(model, variables, PreprocessSpec(class_names=tuple(CLASS_NAMES)), str(out_dir),
               parity_images=list(x[:64]), reference_images=list(x[:1000]), model_name="fashion",
               overwrite=True)
  return out_dir


def sample_png() -> bytes:
  import io
  from PIL import Image
  from jaxclf.data.sources.fashion_mnist import load_arrays
  x, _ = load_arrays()["test"]
  buf = io.BytesIO()
  Image.fromarray(x[0, :, :, 0]).save(buf, "PNG")
  return buf.getvalue()


def write_lua(png: bytes, path: Path, max_requests: int) -> None:
  boundary = "----jaxclfbench7e3a"
  body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="shoe.png"\r\n'
          "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
  lua_body = '"' + "".join(f"\\{b}" for b in body) + '"'
  path.write_text(LUA % {"boundary": boundary, "body": lua_body, "max_requests": max_requests})


def run_wrk(url: str, lua: Path, connections: int, duration: float) -> dict:
  cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, int(round(duration)))}s", "--timeout", "5s", "-s", str(lua),
         url + "/v1/predict"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
  line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
  if line is None:
    raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
  r = json.loads(line[len("WRKJSON "):])
  seconds = r["duration_us"] / 1e6
  ok = r["requests"] - r["errors"]["status"]
  return {"connections": connections, "requests": r["requests"], "seconds": round(seconds, 2),
          "non_2xx": r["errors"]["status"],
          "socket_errors": sum(v for k, v in r["errors"].items() if k != "status"),
          "images_per_s": round(ok / seconds, 1),
          "latency_ms": {k: round(v / 1000, 3) for k, v in r["latency_us"].items()}}


def cpu_seconds(pid: int) -> float:
  fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Gateway:
  def __init__(self, python: str, args: list[str], log: Path):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(log, "wb")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    self.proc = subprocess.Popen([python, "-m", "serving.predict_cli", "serve", "--port",
                                  str(self.port), *args], cwd=REPO, env=env, stdout=self.log,
                                 stderr=subprocess.STDOUT)
    import urllib.request
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
      try:
        with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
          if r.status == 200:
            return
      except OSError:
        time.sleep(0.1)
    raise RuntimeError("gateway not ready")

  def batch_stats(self) -> dict:
    import urllib.request
    text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
      for key in ("jaxclf_inference_batch_size_sum", "jaxclf_inference_batch_size_count"):
        if line.startswith(key + " "):
          vals[key] = float(line.split()[-1])
    return vals

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(15)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()


def measure_gateway(name: str, python: str, args: list[str], lua: Path, duration: float,
                    tmp: Path) -> dict:
  gw = Gateway(python, args, tmp / f"{name}.log")
  try:
    run_wrk(gw.url, lua, 4, 1.0)  # warm-up: connections, allocator, ORT arenas
    result = {"args": args}
    for line in (tmp / f"{name}.log").read_text(errors="replace").splitlines():
      if "model ready" in line:  # e.g. how many rows the model runs inline on the event loop
        result["model_ready_log"] = json.loads(line).get("message")
    for conc in (1, 16):
      before = gw.batch_stats()
      cpu0, load0 = cpu_seconds(gw.proc.pid), loadavg()
      r = run_wrk(gw.url, lua, conc, duration)
      r["server_cpu_ms_per_request"] = round(
          (cpu_seconds(gw.proc.pid) - cpu0) * 1000 / max(r["requests"], 1), 3)
      after = gw.batch_stats()
      calls = after["jaxclf_inference_batch_size_count"] - before.get(
          "jaxclf_inference_batch_size_count", 0)
      imgs = after["jaxclf_inference_batch_size_sum"] - before.get(
          "jaxclf_inference_batch_size_sum", 0)
      r["mean_model_batch"] = round(imgs / calls, 2) if calls else None
      r["loadavg_before"], r["loadavg_after"] = load0, loadavg()
      result[f"c{conc}"] = r
    return result
  finally:
    gw.stop()


def baseline_in_process(export_dir: Path, png: bytes, n: int) -> dict:
  """The same work without HTTP: decode + preprocess + ORT, one image at a time."""
  from jaxclf.data.decode import decode_image
  from jaxclf.data.transforms import preprocess
  from serving.backends import OnnxBackend, load_bundle
  bundle = load_bundle(str(export_dir))
  backend = OnnxBackend(bundle, micro_batching=False)
  times = []
  for i in range(n + 50):
    t0 = time.perf_counter()
    backend.run(preprocess(decode_image(png, 1), bundle.spec)[None])
    if i >= 50:
      times.append(time.perf_counter() - t0)
  x16 = np.repeat(preprocess(decode_image(png, 1), bundle.spec)[None], 16, 0)
  t0 = time.perf_counter()
  for _ in range(200):
    backend.run(x16)
  b16 = 200 * 16 / (time.perf_counter() - t0)
  t = np.asarray(times) * 1000
  return {"requests": n, "latency_ms": {"p50": round(float(np.percentile(t, 50)), 3),
                                        "p99": round(float(np.percentile(t, 99)), 3)},
          "images_per_s_serial": round(n / (t.sum() / 1000), 1),
          "ort_batch16_images_per_s": round(b16, 1)}


SERVE_VENV_PY = REPO / ".venv-serve" / "bin" / "python"
NO_SERVING_VENV = {"skipped": "no serving venv: run scripts/setup_serving_env.sh"}


@contextlib.contextmanager
def triton_for(export_dir: Path, tmp: Path):
  """tritonserver serving `export_dir` as fashion v1 (the gateway then runs in SERVE_VENV_PY)."""
  from jaxclf.export.triton import TritonServer, write_model_repository
  repo = tmp / "model_repository"
  write_model_repository(str(export_dir), str(repo), "fashion", 1)
  with TritonServer(str(repo), log_path=str(tmp / "triton.log")) as triton:
    yield triton


def prepare(args, prog: str, tmp: Path) -> Path | None:
  """The export to serve (built when --model-path is not given); None when wrk is missing."""
  if shutil.which("wrk") is None:
    print(f"{prog} needs wrk: apt-get install wrk", file=sys.stderr)
    return None
  return Path(args.model_path) if args.model_path else make_export(args.arch, tmp / "export")


def triton_phase(export_dir: Path, lua: Path, duration: float, tmp: Path) -> dict:
  if not SERVE_VENV_PY.exists():
    return NO_SERVING_VENV
  serve_py = SERVE_VENV_PY
  with triton_for(export_dir, tmp) as triton:
    out = {}
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
      out[protocol] = measure_gateway(
          f"triton-{protocol}", str(serve_py),
          ["--model-path", str(export_dir), "--backend", "triton", "--triton-url", url,
           "--triton-protocol", protocol, "--model", "fashion_image", "--no-request-log"],
          lua, duration, tmp)
    return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model-path", help="export dir (default: build one of --arch)")
  p.add_argument("--arch", default="cnn", help="model to export when --model-path is not given")
  p.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
  p.add_argument("--max-requests", type=int, default=200_000, help="cap per wrk run")
  p.add_argument("--no-triton", action="store_true")
  p.add_argument("--request-log", action="store_true", help="keep JSON request logs on")
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args(argv)
  tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
  try:
    export_dir = prepare(args, "bench/serve.py", tmp)
    if export_dir is None:
      return 2
    png = sample_png()
    lua = tmp / "predict.lua"
    write_lua(png, lua, args.max_requests)
    log_flag = [] if args.request_log else ["--no-request-log"]
    result = {
        "bench": "serve", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": loadavg()},
        "model": {"export": str(export_dir), "arch": None if args.model_path else args.arch},
        "image": {"format": "PNG", "size": [28, 28], "bytes": len(png)},
        "load_generator": "wrk 1 thread, multipart POST /v1/predict",
        "duration_s": args.duration,
        "baseline_in_process": baseline_in_process(export_dir, png, 2000),
    }
    py = sys.executable
    result["embedded_batching"] = measure_gateway(
        "embedded", py, ["--model-path", str(export_dir), *log_flag], lua, args.duration, tmp)
    result["embedded_no_batching"] = measure_gateway(
        "embedded-nobatch", py, ["--model-path", str(export_dir), "--no-micro-batching", *log_flag],
        lua, args.duration, tmp)
    result["triton"] = ({"skipped": "--no-triton"} if args.no_triton
                        else triton_phase(export_dir, lua, args.duration, tmp))
    eb = result["embedded_batching"]
    result["goals"] = {
        "embedded_c1_p99_ms": eb["c1"]["latency_ms"]["p99"],
        "embedded_c1_p99_le_5ms": eb["c1"]["latency_ms"]["p99"] <= 5.0,
        "embedded_c16_batching_images_per_s": eb["c16"]["images_per_s"],
        "embedded_c16_batching_ge_1500": eb["c16"]["images_per_s"] >= 1500,
        "embedded_c16_no_batching_images_per_s": result["embedded_no_batching"]["c16"]["images_per_s"],
    }
    result["machine"]["loadavg_end"] = loadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
      os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
      Path(args.out).write_text(text + "\n")
    return 0
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
