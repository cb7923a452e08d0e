import hashlib
import os
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Parallel workers (pytest-xdist, `-n 2`: scripts/test.sh). Each worker takes server ports from its
# own range, below the kernel's ephemeral range (32768+ on Linux) so that outgoing connections do not
# take them either: two workers never choose the same port, whereas two processes asking the kernel
# for "any free port" can be handed the same one before either server binds it.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; unset in a serial run
WORKER_INDEX = int(WORKER[2:]) if WORKER[2:].isdigit() else 0
PORTS_PER_WORKER = 1000
_PORT_BASE = int(os.environ.get("JAXCLF_TEST_PORT_BASE", "20000"))
os.environ["JAXCLF_PORT_RANGE"] = (f"{_PORT_BASE + WORKER_INDEX * PORTS_PER_WORKER}-"
                                   f"{_PORT_BASE + (WORKER_INDEX + 1) * PORTS_PER_WORKER - 1}")


def _pin_worker_cpus() -> None:
  """JAXCLF_TEST_CPUS_PER_WORKER=N: this worker (and every process it starts) runs on its own N
  CPUs, so XLA sizes its thread pool to N instead of every worker using all cores. Unset: no pinning.
  Set before JAX starts its threads, which take the mask of the thread that creates them. Workers
  only: the xdist controller (and a serial run) keeps every CPU, and the workers inherit its mask."""
  n = int(os.environ.get("JAXCLF_TEST_CPUS_PER_WORKER") or 0)
  if n <= 0 or not WORKER or not hasattr(os, "sched_setaffinity"):
    return
  cpus = sorted(os.sched_getaffinity(0))
  first = (WORKER_INDEX * n) % len(cpus)
  os.sched_setaffinity(0, [cpus[(first + i) % len(cpus)] for i in range(min(n, len(cpus)))])


_pin_worker_cpus()

# One persistent XLA compilation cache for the suite, its subprocesses (the `jaxclf` CLI reads
# JAXCLF_COMPILATION_CACHE) and notebook kernels (plain JAX reads JAX_COMPILATION_CACHE_*): the same
# tiny models are compiled by dozens of tests and processes. Apart from the user's own cache, so a
# test run neither fills nor relies on it. Bounded, which also makes JAX lock it between processes.
_XLA_CACHE = os.environ.setdefault("JAXCLF_COMPILATION_CACHE", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxclf", "xla-tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# Compilations over 0.1 s, not only those over JAX's default second: the suite compiles the same
# hundreds of small programs (tiny models, eval steps) in every run and process. Not 0: JAX's
# bounded cache scans every entry on each write, so thousands of millisecond-sized entries (eager
# ops) cost a cold run more than they save a warm one. Measured on 5 compile-heavy files
# (tests/README.md): warm 135 s -> 101 s, cold unchanged (164 -> 168 s).
os.environ.setdefault("JAXCLF_COMPILATION_CACHE_MIN_S", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                      os.environ["JAXCLF_COMPILATION_CACHE_MIN_S"])
from jaxclf.ops.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


@pytest.fixture(scope="session")
def repo_root():
  return ROOT


def free_port() -> int:
  """A loopback port for a server a test starts: from this worker's JAXCLF_PORT_RANGE, through the
  same allocator as jaxclf's Triton servers, so one process never hands out a port twice."""
  from jaxclf.export.triton_server import free_port as allocate  # noqa: PLC0415
  return allocate()


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float, failure: str) -> None:
  """Until `url` answers; kills `proc` and raises RuntimeError(failure) if it exits or times out."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      urllib.request.urlopen(url, timeout=2).read()
      return
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(failure) from None
      time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
  """moto's S3 server in its own process on a free port; AWS_* env points s3fs/boto3 at it."""
  port = free_port()
  log = open(os.devnull, "wb")
  proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=log, stderr=log)
  url = f"http://127.0.0.1:{port}"
  wait_for_http(url + "/moto-api/", proc, 30, "moto S3 server did not start (is moto installed? "
                "pip install -r requirements/data.txt)")
  saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
  os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1"})
  try:
    yield url
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def s3_bucket(s3_server, request):
  import boto3  # noqa: PLC0415
  s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
  name = "b-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
  s3.create_bucket(Bucket=name)
  return s3, name




def train_tiny_run(workdir: str, overrides=()) -> dict:
  """configs/cnn.py:tiny (tiny model, 512 images per split, 2 epochs) trained into `workdir`."""
  from jaxclf.config import load_config  # noqa: PLC0415
  from jaxclf.train.loop import train_and_evaluate  # noqa: PLC0415
  config = load_config(f"{ROOT}/configs/cnn.py:tiny", overrides=list(overrides), environ={})
  return train_and_evaluate(config, workdir)


@pytest.fixture(scope="session")
def single_view_tiny_run(tmp_path_factory):
  """One tiny run per session with test-time augmentation off, so that run.json's
  metrics.test.accuracy is the single-view figure of the model an export serves.
  -> (run_dir, run.json record)."""
  workdir = str(tmp_path_factory.mktemp("tiny-single-view"))
  return workdir, train_tiny_run(workdir, ["train.tta_flip=false"])


# The test files that take longest, longest first (worker seconds, summed over each file's tests,
# from `pytest -n 2 --dist loadfile --durations=0` on a quiet 2-core machine, warm compilation
# cache). With `--dist loadfile` a worker takes a whole file at a time; pytest-xdist by default
# hands files out by their number of tests, which put one-test files of 30 s at the end of the
# run, with the other worker idle. scripts/test.sh passes --no-loadscope-reorder, so files go out
# in this order (then the rest, alphabetically): longest processing time first, the classic
# schedule that keeps the workers' finishing times close. Only the order changes, never which tests.
LONGEST_FIRST = (
    "test_distributed_trainer.py",    # 57 s
    "test_notebooks.py",              # 52
    "test_triton.py",                 # 33
    "test_accuracy_regression.py",    # 31
    "test_faults_storage.py",         # 29
    "test_images.py",                 # 27
    "test_mlflow_registry.py",        # 26
    "test_sweeps.py",                 # 26
    "test_beam_ingest.py",            # 25
    "test_serving.py",                # 25
    "test_train.py",                  # 21
    "test_onednn_depthwise.py",       # 19
    "test_serving_hardening.py",      # 18
    "test_report.py",                 # 17
    "test_models.py",                 # 17
    "test_layers.py",                 # 17
    "test_cnn_levers.py",             # 16
    "test_postgres.py",               # 16
    "test_faults_serving.py",         # 16
    "test_autoaugment.py",            # 14
    "test_transfer.py",               # 14
    "test_export.py",                 # 12
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable within a file
