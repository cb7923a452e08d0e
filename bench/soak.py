"""Soak test of the REST gateway: minutes of mixed traffic on 127.0.0.1 -> JSON.

  python bench/soak.py                         # builds a cnn export, both backends, 120 s each
  python bench/soak.py --duration 90 --no-triton --out bench/results/soak.json

wrk (c=16, one thread) sends a fixed, seeded mix to POST /v1/predict, drawn per request:
  good       Fashion-MNIST PNGs and the corpus' good files (PNG/JPEG/WebP/GIF/BMP/TIFF, modes)
  hostile    the corpus' bad files: bombs, truncated, zero bytes, text disguised as images
  oversized  a body over max_upload_bytes (refused by Content-Length, drained)
against `jaxclf serve` with onnxruntime in-process, then with the Triton backend (tritonserver's
fashion_image ensemble over gRPC) when the serving venv exists. Bounded by --duration and by
--max-requests per run; loopback only.

Reported per backend: status counts by class (5xx must be 0), p50/p99 latency, requests/s and
images/s (2xx), and the gateway's RSS after warm-up and at the end: the end must stay within
RSS_BOUND_MB of the start (no leak under hostile input).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # corpus.py: the hostile-file corpus the tests use

from _common import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from serve import (NO_SERVING_VENV, SERVE_VENV_PY, Gateway, cpu_seconds, loadavg,  # noqa: E402
                   prepare, triton_for)

RSS_BOUND_MB = 40.0
MIX = {"good": 0.80, "hostile": 0.19, "oversized": 0.01}
BOUNDARY = "----jaxclfsoak51c2"

LUA_HEAD = r"""
local bodies = { %(bodies)s }
local order = { %(order)s }
local max_requests = %(max_requests)d
local i, count = 0, 0
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) s2, s4, s5, sx = 0, 0, 0, 0 end
request = function()
  i = i %% #order + 1
  return wrk.format("POST", "/v1/predict",
    {["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"}, bodies[order[i]])
end
response = function(status, headers, body)
  count = count + 1
  if status >= 500 then s5 = s5 + 1 elseif status >= 400 then s4 = s4 + 1
  elseif status >= 200 and status < 300 then s2 = s2 + 1 else sx = sx + 1 end
  if count >= max_requests then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  local t2, t4, t5, tx = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    t2 = t2 + t:get("s2"); t4 = t4 + t:get("s4"); t5 = t5 + t:get("s5"); tx = tx + t:get("sx")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"s2xx":%%d,"s4xx":%%d,"s5xx":%%d,"other":%%d,' ..
    '"socket_errors":%%d,"latency_us":{"p50":%%d,"p99":%%d,"max":%%d}}\n',
    summary.requests, summary.duration, t2, t4, t5, tx,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def multipart(name: str, data: bytes) -> bytes:
  return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
          "Content-Type: application/octet-stream\r\n\r\n").encode() + data + \
      f"\r\n--{BOUNDARY}--\r\n".encode()


def traffic(seed: int, oversized_bytes: int) -> tuple[list[tuple[str, bytes]], list[int]]:
  """(kind, body) list and a seeded order of 4,096 indices into it following MIX."""
  import io

  import corpus
  from PIL import Image

  from jaxclf.data.sources.fashion_mnist import load_arrays
  x, _ = load_arrays()["test"]
  good = []
  for k in range(8):
    buf = io.BytesIO()
    Image.fromarray(x[k, :, :, 0]).save(buf, "PNG")
    good.append(("good", multipart(f"fmnist{k}.png", buf.getvalue())))
  good += [("good", multipart(i.name, i.data)) for i in corpus.good_items()]
  hostile = [("hostile", multipart(i.name, i.data)) for i in corpus.bad_items()]
  big = [("oversized", multipart("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(1024)
                                 * (oversized_bytes // 1024 + 1)))]
  bodies = good + hostile + big
  pools = {"good": range(len(good)), "hostile": range(len(good), len(good) + len(hostile)),
           "oversized": [len(bodies) - 1]}
  rng = random.Random(seed)
  kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=4096)
  return bodies, [rng.choice(pools[k]) for k in kinds]


def write_lua(path: Path, bodies, order, max_requests: int) -> None:
  def lua_string(b: bytes) -> str:
    return '"' + "".join(f"\\{c}" for c in b) + '"'
  path.write_text(LUA_HEAD % {
      "bodies": ", ".join(lua_string(b) for _, b in bodies),
      "order": ", ".join(str(i + 1) for i in order), "max_requests": max_requests,
      "boundary": BOUNDARY})


def rss_mb(pid: int) -> float:
  for line in Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return round(int(line.split()[1]) / 1024, 1)
  raise RuntimeError("no VmRSS")


def soak(name: str, python: str, args: list[str], lua: Path, duration: float, connections: int,
         tmp: Path, extra_pids=()) -> dict:
  import json
  gw = Gateway(python, args, tmp / f"{name}.log")
  try:
    _wrk(gw.url, lua, connections, 5)  # warm-up: allocator pools, ORT arenas, caches
    rss0 = rss_mb(gw.proc.pid)
    extra0 = {str(p): rss_mb(p) for p in extra_pids}
    cpu0, load0 = cpu_seconds(gw.proc.pid), loadavg()
    r = _wrk(gw.url, lua, connections, duration)
    rss1 = rss_mb(gw.proc.pid)
    seconds = r["duration_us"] / 1e6
    out = {
        "args": args, "connections": connections, "seconds": round(seconds, 1),
        "requests": r["requests"], "status": {"2xx": r["s2xx"], "4xx": r["s4xx"],
                                              "5xx": r["s5xx"], "other": r["other"]},
        "socket_errors": r["socket_errors"],
        "requests_per_s": round(r["requests"] / seconds, 1),
        "images_per_s_2xx": round(r["s2xx"] / seconds, 1),
        "latency_ms": {k: round(v / 1000, 3) for k, v in r["latency_us"].items()},
        "server_cpu_s": round(cpu_seconds(gw.proc.pid) - cpu0, 1),
        "loadavg_before": load0, "loadavg_after": loadavg(),
        "gateway_rss_mb": {"start": rss0, "end": rss1, "growth": round(rss1 - rss0, 1),
                           "bound": RSS_BOUND_MB},
    }
    if extra_pids:
      out["backend_rss_mb"] = {p: {"start": v, "end": rss_mb(int(p))} for p, v in extra0.items()}
    out["ok"] = (r["s5xx"] == 0 and r["other"] == 0 and r["socket_errors"] == 0
                 and rss1 - rss0 <= RSS_BOUND_MB)
    json.dumps(out)  # fail here, not at the end, on anything not serialisable
    return out
  finally:
    gw.stop()


def _wrk(url: str, lua: Path, connections: int, duration: float) -> dict:
  import json
  cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, int(round(duration)))}s", "--timeout", "10s",
         "-s", str(lua), url + "/v1/predict"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
  line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
  if line is None:
    raise RuntimeError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")
  return json.loads(line[len("WRKJSON "):])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model-path", help="export dir (default: build one of --arch)")
  p.add_argument("--arch", default="cnn")
  p.add_argument("--duration", type=int, default=120, help="seconds of traffic per backend")
  p.add_argument("--connections", type=int, default=16)
  p.add_argument("--max-requests", type=int, default=2_000_000, help="cap per run")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-triton", action="store_true")
  p.add_argument("--out", default="docs/results/soak.json")
  args = p.parse_args(argv)
  from serving.settings import ServeSettings
  tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
  try:
    export_dir = prepare(args, "bench/soak.py", tmp)
    if export_dir is None:
      return 2
    bodies, order = traffic(args.seed, ServeSettings().max_upload_bytes + 4096)
    lua = tmp / "soak.lua"
    write_lua(lua, bodies, order, args.max_requests)
    mix = {k: sum(1 for i in order if bodies[i][0] == k) / len(order) for k in MIX}
    result = {"bench": "soak", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg()},
              "model": {"export": str(export_dir), "arch": None if args.model_path else args.arch},
              "mix": {k: round(v, 3) for k, v in mix.items()},
              "distinct_bodies": {k: sum(1 for kind, _ in bodies if kind == k) for k in MIX},
              "load_generator": f"wrk 1 thread, c={args.connections}, POST /v1/predict"}
    base = ["--model-path", str(export_dir), "--no-request-log"]
    result["onnx"] = soak("onnx", sys.executable, base, lua, args.duration, args.connections, tmp)
    result["triton"] = {"skipped": "--no-triton"} if args.no_triton else _triton(
        export_dir, base, lua, args, tmp)
    result.update(verdict({"onnx": result["onnx"], "triton": result["triton"]}))
    result["machine"]["loadavg_end"] = loadavg()
    emit(result, args.out)
    print(f"soak: passed {result['passed'] or '-'}, failed {result['failed'] or '-'}, skipped "
          f"{', '.join(f'{k} ({v})' for k, v in result['skipped'].items()) or '-'}",
          file=sys.stderr)
    return 0 if result["ok"] else 1
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def verdict(backends: dict[str, dict]) -> dict:
  """Per backend: passed (its run said ok), failed (ran, and did not say ok) or skipped (did not
  run; never counted as passing). ok: at least one backend ran and every one that ran passed."""
  skipped = {k: r["skipped"] for k, r in backends.items() if "skipped" in r}
  ran = {k: r for k, r in backends.items() if k not in skipped}
  passed = sorted(k for k, r in ran.items() if r.get("ok") is True)
  failed = sorted(k for k in ran if k not in passed)
  return {"ok": bool(ran) and not failed, "passed": passed, "failed": failed, "skipped": skipped}


def _triton(export_dir: Path, base: list[str], lua: Path, args, tmp: Path) -> dict:
  if not SERVE_VENV_PY.exists():
    return NO_SERVING_VENV
  with triton_for(export_dir, tmp) as triton:
    return soak("triton", str(SERVE_VENV_PY), [*base, "--backend", "triton", "--triton-url",
                                                triton.grpc_url, "--model", "fashion_image"],
                lua, args.duration, args.connections, tmp, extra_pids=[triton.proc.pid])

if __name__ == "__main__":
  sys.exit(main())
