"""Storage faults survived: a full disk under training, ingest and export (a size-limited tmpfs
mounted by the test), and an object store that goes away mid-way (moto's S3 server stopped and
started again on the same port). Each stops with one line naming the path or URI, leaves nothing
half-written that a later step would trust, and a rerun after the fault is gone completes with
the same result as a run that never met it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jaxclf import diskspace
from jaxclf.train.checkpoints import load_inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"
BEAM_PY = os.path.join(ROOT, ".venv-beam", "bin", "python")


# ----------------------------------------------------------------------------- a small filesystem

@contextlib.contextmanager
def tmpfs(path: str, size: str):
  """A tmpfs of `size` mounted at `path` for the block; skipped only where mounting is impossible
  (not root; CI runs as root, so there it runs)."""
  os.makedirs(path, exist_ok=True)
  # In CI (root) a failed mount is a broken machine, not a reason to skip the disk-full proofs.
  give_up = pytest.fail if os.environ.get("CI") else pytest.skip
  if os.geteuid() != 0:
    give_up("mounting a size-limited tmpfs needs root (CI runs the suite as root)")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                     capture_output=True, text=True)
  if r.returncode:
    give_up(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def fill(path: str, leave: int) -> str:
  """A filler file that leaves about `leave` bytes free on `path`'s filesystem; deleting it is
  how the test 'frees space'."""
  filler = os.path.join(path, "filler")
  todo = diskspace.free_bytes(path) - leave
  with open(filler, "wb") as f:
    chunk = b"\0" * (1 << 16)
    while todo > 0:
      todo -= f.write(chunk[:min(len(chunk), todo)])
  return filler


def last_line(text: str) -> str:
  lines = [ln for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- training

def _train_cmd(workdir: str) -> list[str]:
  # 4 epochs of the tiny config (32 steps) with a checkpoint every 4 (where the logged training
  # loss window closes too): a fault after the first checkpoint leaves most of the run to go.
  return [sys.executable, "-m", "jaxclf.main", f"--config={ROOT}/configs/cnn.py:tiny",
          f"--workdir={workdir}", "--config.train.num_epochs=4",
          "--config.periodic.checkpoint=4 steps"]


def _committed(d: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for_checkpoint_then_stop(proc, latest: str) -> int:
  """SIGSTOPs the trainer as soon as its first step is committed (renamed from its temp name):
  the disk is then filled at a known point, with the rest of the run still to go."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if _committed(latest):
      proc.send_signal(signal.SIGSTOP)
      return max(_committed(latest))
    time.sleep(0.01)
  raise AssertionError("the run ended (or stalled) before its first checkpoint")


def test_disk_full_in_training_stops_then_resumes_bit_identically(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ref_dir = str(tmp_path / "ref")
  subprocess.run(_train_cmd(ref_dir), check=True, env=env, cwd=ROOT, capture_output=True)

  with tmpfs(str(tmp_path / "disk"), "16m") as disk:
    cut_dir = os.path.join(disk, "run")
    latest = os.path.join(cut_dir, "checkpoints", "latest")
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
      proc = subprocess.Popen(_train_cmd(cut_dir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=err)
      try:
        first = _wait_for_checkpoint_then_stop(proc, latest)
        step_bytes = diskspace.tree_bytes(os.path.join(latest, str(first)))
        # Room for the logs and run.json between checkpoints, not for another checkpoint.
        filler = fill(disk, leave=step_bytes // 2)
        before = json.load(open(os.path.join(cut_dir, "run.json")))
      finally:
        proc.send_signal(signal.SIGCONT)
      proc.wait(timeout=300)
    stderr = err_path.read_text()
    line = last_line(stderr)
    assert proc.returncode == 2, stderr[-3000:]
    assert line.startswith("jaxclf: error: disk full: checkpoint step "), line
    assert f" at {cut_dir}/checkpoints/" in line and "bytes, " in line and " are free" in line
    assert "rerun the same command" in line

    # What survives: committed steps only (no temp directory left), each restorable, and a
    # run.json that parses and says what happened.
    for kind in ("latest", "best"):
      d = os.path.join(cut_dir, "checkpoints", kind)
      assert not [n for n in os.listdir(d) if TMP_SUFFIX in n], os.listdir(d)
    kept = _committed(latest)
    assert kept and kept[-1] >= first
    assert load_inference(cut_dir, "latest").step == kept[-1]
    record = json.load(open(os.path.join(cut_dir, "run.json")))
    assert record["status"] in ("failed", "running") and record["name"] == before["name"]

    os.unlink(filler)  # space freed: the same command resumes from the last committed step
    done = subprocess.run(_train_cmd(cut_dir), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = json.load(open(os.path.join(ref_dir, "run.json")))
    cut = json.load(open(os.path.join(cut_dir, "run.json")))
    assert cut["status"] == "completed" and cut["resumed_from_step"] == kept[-1]
    assert cut["final_step"] == ref["final_step"] == 32
    a, b = load_inference(ref_dir, "latest"), load_inference(cut_dir, "latest")
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert cut["metrics"] == ref["metrics"]
    assert cut["calibration"] == ref["calibration"]
    untimed = lambda history: [{k: v for k, v in h.items() if k != "wall_time"} for h in history]
    assert untimed(cut["history"]) == untimed(ref["history"])


def test_disk_full_inside_an_asynchronous_save_removes_its_temp_step(tmp_path):
  """The check before a save estimates from the last committed step; when a state outgrows it,
  the ENOSPC met by Orbax's background write is what stops the run: its temporary directory is
  removed and the error names the step, the path and the bytes."""
  import flax.struct  # noqa: PLC0415

  from jaxclf.train.checkpoints import Checkpointer, restore_state  # noqa: PLC0415
  from jaxclf.train.loop_state import LoopState  # noqa: PLC0415

  @flax.struct.dataclass
  class State:
    step: jax.Array
    params: jax.Array

  rng = np.random.default_rng(0)
  small = State(step=jax.numpy.int32(1), params=jax.numpy.asarray(rng.standard_normal(256),
                                                                   np.float32))
  # Random float32s do not compress: 1.2 MB cannot fit the 512 KiB filesystem.
  big = State(step=jax.numpy.int32(2), params=jax.numpy.asarray(rng.standard_normal(300_000),
                                                                 np.float32))
  with tmpfs(str(tmp_path / "disk"), "512k") as disk:
    ckpt = Checkpointer(os.path.join(disk, "run"), keep=2)
    ckpt.save(small, LoopState())
    ckpt.wait()
    ckpt.save(big, LoopState())  # passes the estimate (the small step's size); fails in writing
    with pytest.raises(diskspace.DiskFullError) as e:
      ckpt.wait()
    ckpt.close()
    latest = os.path.join(disk, "run", "checkpoints", "latest")
    msg = str(e.value)
    # 300,000 float32 params and an int32 step, uncompressed: what the estimate fell short of.
    assert msg.startswith(f"disk full: checkpoint step 2 at {latest}/2 needs about 1200004 bytes")
    assert msg.endswith("it resumes from checkpoint step 1"), msg
    assert os.listdir(latest) == ["1"]  # the half-written step 2 is gone, step 1 intact
    again = Checkpointer(os.path.join(disk, "run"), keep=2)
    restored = restore_state(again.latest, 1, small, with_meta=False)["state"]
    np.testing.assert_array_equal(np.asarray(restored.params), small.params)
    again.close()


# ----------------------------------------------------------------------------- ingest

def _noise_folder(root: str, classes=("a", "b", "c"), per_class: int = 20, size: int = 48) -> str:
  """Class folders of noise PNGs (~7 KB each: noise does not compress), distinct by seed."""
  from PIL import Image  # noqa: PLC0415
  rng = np.random.default_rng(0)
  for cls in classes:
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(per_class):
      img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(img).save(os.path.join(root, cls, f"{i:03d}.png"))
  return root


def _ingest_args(src: str, out: str) -> list[str]:
  return ["data", "ingest", src, "--out", out, "--shard-mb", "0.05", "--workers", "2",
          "--index", "json"]


def test_disk_full_in_ingest_stops_then_rerun_gives_the_same_version(tmp_path, monkeypatch,
                                                                     capsys):
  from jaxclf.data import data_cli, ingest_shards  # noqa: PLC0415
  from jaxclf.data.sources import ingested  # noqa: PLC0415

  src = _noise_folder(str(tmp_path / "src"))
  assert data_cli.main(_ingest_args(src, str(tmp_path / "ref"))) == 0
  ref = json.load(open(tmp_path / "ref" / ingested.MANIFEST))
  capsys.readouterr()

  with tmpfs(str(tmp_path / "disk"), "2m") as disk:
    out = os.path.join(disk, "ds")
    written, filler = [], []
    real_write_shard = ingest_shards.write_shard

    def write_shard_then_fill(path, *a, **kw):  # the disk fills after the second shard
      if len(written) == 2 and not filler:
        filler.append(fill(disk, leave=0))
      row = real_write_shard(path, *a, **kw)
      written.append(row["file"])
      return row

    monkeypatch.setattr(ingest_shards, "write_shard", write_shard_then_fill)
    assert data_cli.main(_ingest_args(src, out)) == 2
    err = capsys.readouterr().err.strip()
    assert [ln for ln in err.splitlines() if not ln.startswith("[ingest] ")] == [last_line(err)]
    err = last_line(err)  # the progress lines, then one error line
    assert err.startswith(f"error: disk full: the dataset's shards, index and manifest at {out} "
                          "needs about "), err
    assert "rerun the same command" in err
    # Nothing claims the missing shards; the two finished ones stay; no half-written file.
    assert not os.path.exists(os.path.join(out, ingested.MANIFEST))
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == sorted(written)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    os.unlink(filler[0])  # space freed: the same command finishes the dataset
    assert data_cli.main(_ingest_args(src, out)) == 0
    got = json.load(open(os.path.join(out, ingested.MANIFEST)))
    assert got["version"] == ref["version"] and got["num_records"] == ref["num_records"] == 60
    shards = lambda m: {s: v["shards"] for s, v in m["splits"].items()}
    assert shards(got) == shards(ref)  # the same shard files, byte for byte (sha256 each)


# ----------------------------------------------------------------------------- export

def test_disk_full_in_export_leaves_nothing_verify_or_the_registry_accepts(
    single_view_tiny_run, tmp_path, monkeypatch, capsys):
  from jaxclf.artifacts import ArtifactError, verify_export_dir  # noqa: PLC0415
  from jaxclf.export import onnx as onnx_export  # noqa: PLC0415
  from jaxclf.deploy.cli import main  # noqa: PLC0415
  from jaxclf.registry import Registry, RegistryError  # noqa: PLC0415

  run_dir, _ = single_view_tiny_run
  registry = str(tmp_path / "registry")
  with tmpfs(str(tmp_path / "disk"), "1m") as disk:
    out = os.path.join(disk, "export")
    export = ["export", "--run", run_dir, "--out", out, "--register", "fashion",
              "--root", registry]

    real_write_text = onnx_export._write_text

    def fill_then_write(path, text):  # the disk fills once the two graphs are written
      if not os.path.exists(os.path.join(disk, "filler")):
        fill(disk, leave=0)
      return real_write_text(path, text)

    monkeypatch.setattr(onnx_export, "_write_text", fill_then_write)
    assert main(export) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"jaxclf: error: disk full: the export at {out} needs about "), line
    assert line.endswith("free space and export again"), line
    assert os.listdir(disk) == ["filler"]  # no export dir, no temp dir left
    with pytest.raises(ArtifactError):
      verify_export_dir(out)
    with pytest.raises(RegistryError, match="refusing to register"):
      Registry(registry).register(out, "fashion")
    assert Registry(registry).names() == []
    monkeypatch.setattr(onnx_export, "_write_text", real_write_text)
    os.unlink(os.path.join(disk, "filler"))

    # Space freed: the same command exports, verifies and registers version 1.
    assert main(export) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["registered"]["version"] == 1
    assert verify_export_dir(out)["artifacts"]
    assert [v.version for v in Registry(registry).list_versions("fashion")] == [1]


# ----------------------------------------------------------------------------- a lost object store

class StoppableS3:
  """moto's S3 app on 127.0.0.1:<port>, served from this process so that a test stops it at an
  exact point (connections then get refused) and starts it again on the same port. Its buckets
  live in this process's moto backends and survive the restart, as a real store's data would."""

  def __init__(self):
    from conftest import free_port  # noqa: PLC0415
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = None
    self._lock = threading.Lock()

  def start(self) -> None:
    from moto.moto_server.werkzeug_app import (  # noqa: PLC0415
        DomainDispatcherApplication, MotoRequestHandler, create_backend_app)
    from werkzeug.serving import make_server  # noqa: PLC0415
    with self._lock:
      if self._server is None:
        self._server = make_server("127.0.0.1", self.port,
                                   DomainDispatcherApplication(create_backend_app), threaded=True,
                                   request_handler=MotoRequestHandler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def stop(self) -> None:
    with self._lock:
      if self._server is not None:
        self._server.shutdown()
        self._server.server_close()  # the port refuses connections, as a dead server's does
        self._server = None

  def client(self):
    import boto3  # noqa: PLC0415
    return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")

  def upload_tree(self, folder: str, bucket: str, prefix: str) -> None:
    s3 = self.client()
    for d, _, files in os.walk(folder):
      for f in files:
        rel = os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        s3.upload_file(os.path.join(d, f), bucket, f"{prefix}/{rel}")


ATTEMPTS = 3  # AWS_MAX_ATTEMPTS for these tests: botocore's backoff then waits at most 1 + 2 s


@pytest.fixture
def s3(monkeypatch, request):
  server = StoppableS3()
  server.start()
  for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_ENDPOINT_URL": server.url, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_MAX_ATTEMPTS": str(ATTEMPTS)}.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
  server.bucket = "b-" + request.node.name[-40:].lower().replace("_", "-").strip("-")
  server.client().create_bucket(Bucket=server.bucket)
  yield server
  server.stop()


def _stop_after(server: StoppableS3, n: int, fn):
  """`fn` wrapped: after its n-th call returns, the server stops (the hook that makes the outage
  happen at a known point rather than after a sleep)."""
  calls = []
  lock = threading.Lock()

  def wrapped(*a, **kw):
    out = fn(*a, **kw)
    with lock:
      calls.append(1)
      if len(calls) == n:
        server.stop()
    return out
  return wrapped


def test_s3_lost_while_ingest_reads_the_bucket(s3, tmp_path, monkeypatch, capsys):
  s3.upload_tree(_noise_folder(str(tmp_path / "src")), s3.bucket, "src")
  _ingest_survives_a_lost_store(s3, f"s3://{s3.bucket}/src/", tmp_path, monkeypatch, capsys,
                                f"gave up after {ATTEMPTS} attempts (botocore 'standard' retries)")


def _ingest_survives_a_lost_store(server, src, tmp_path, monkeypatch, capsys, retry_text):
  """Ingest of `src` with `server` stopped after 10 reads: one line naming the URI and the
  library's retries, no manifest; restarted on the same port, the same command completes the
  dataset an uninterrupted ingest made."""
  from jaxclf.data import data_cli  # noqa: PLC0415
  from jaxclf.data.sources import ingested, remote  # noqa: PLC0415
  assert data_cli.main(_ingest_args(src, str(tmp_path / "ref"))) == 0  # never interrupted
  ref = json.load(open(tmp_path / "ref" / ingested.MANIFEST))

  real_read = remote.Opener.read
  monkeypatch.setattr(remote.Opener, "read", _stop_after(server, 10, real_read))
  out = str(tmp_path / "out")
  capsys.readouterr()
  assert data_cli.main(_ingest_args(src, out)) == 2
  line = last_line(capsys.readouterr().err)
  assert line.startswith(f"error: {src}"), line
  assert "the object store did not answer the read" in line and retry_text in line, line
  assert not os.path.exists(os.path.join(out, ingested.MANIFEST))

  monkeypatch.setattr(remote.Opener, "read", real_read)
  server.start()  # back on the same port: the same command completes the same dataset
  assert data_cli.main(_ingest_args(src, out)) == 0
  got = json.load(open(os.path.join(out, ingested.MANIFEST)))
  assert got["version"] == ref["version"] and got["num_records"] == ref["num_records"]
  assert got["report"]["num_skipped"] == 0


@pytest.mark.slow  # S3 lost mid-ingest is the default suite's proof of an outage
def test_s3_lost_while_training_downloads_the_shards(s3, tmp_path, monkeypatch, capsys):
  from jaxclf.cli import run_training  # noqa: PLC0415
  from jaxclf.data import data_cli  # noqa: PLC0415
  from jaxclf.data.sources import ingested, remote  # noqa: PLC0415

  local = str(tmp_path / "ds")
  assert data_cli.main(_ingest_args(_noise_folder(str(tmp_path / "src")), local)) == 0
  manifest = json.load(open(os.path.join(local, ingested.MANIFEST)))
  s3.upload_tree(local, s3.bucket, "ds")
  uri = f"s3://{s3.bucket}/ds"
  cache = str(tmp_path / "cache")
  overrides = [f"--config.data.source={uri}", f"--config.data.cache_dir={cache}",
               "--config.data.limit_per_split=0", "--config.train.batch_size=8",
               "--config.train.num_epochs=1", "--config.train.eval_batch_size=16"]
  workdir = str(tmp_path / "run")

  real_download = remote.download
  monkeypatch.setattr(remote, "download", _stop_after(s3, 1, real_download))
  capsys.readouterr()
  assert run_training(f"{ROOT}/configs/cnn.py:tiny", workdir, overrides) == 2
  line = last_line(capsys.readouterr().err)
  assert line.startswith(f"jaxclf: error: {uri}/"), line
  assert "the object store did not answer the download" in line
  assert line.endswith("Rerun the same command when it is back")
  cached = os.path.join(cache, "ingested", manifest["version"])
  assert not [f for f in os.listdir(cached) if ".part" in f]  # nothing half-downloaded kept

  monkeypatch.setattr(remote, "download", real_download)
  s3.start()
  assert run_training(f"{ROOT}/configs/cnn.py:tiny", workdir, overrides) == 0
  record = json.load(open(os.path.join(workdir, "run.json")))
  assert record["status"] == "completed"
  assert record["dataset"]["version"] == manifest["version"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A real export of an (untrained) tiny CNN: what the registry uploads."""
  from jaxclf.data.transforms import PreprocessSpec  # noqa: PLC0415
  from jaxclf.export.onnx import export_model  # noqa: PLC0415
  from jaxclf.models import create_model  # noqa: PLC0415
  model = create_model("cnn_tiny", num_classes=3)
  variables = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 28, 28, 1)), train=False)
  images = list(np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8))
  out = str(tmp_path_factory.mktemp("export") / "cnn")
  export_model(model, variables, PreprocessSpec(class_names=("a", "b", "c")), out,
               parity_images=images, model_name="cnn_tiny", batch_sizes=(1, 8))
  return out


@pytest.mark.slow  # an export of its own; S3 lost mid-ingest is the default suite's proof
def test_s3_lost_while_the_registry_uploads_a_version(s3, tiny_export, tmp_path, monkeypatch):
  from jaxclf.registry import Registry, RegistryError  # noqa: PLC0415
  from jaxclf.registry.store import Store  # noqa: PLC0415

  root = f"s3://{s3.bucket}/registry"
  registry = lambda: Registry(root, cache_dir=str(tmp_path / "cache"))
  # Lost after two of the artefacts, then (second try) after version.json but before the
  # register event: neither half-registered version is ever listed.
  for method, after in (("put_file", 2), ("write_atomic", 1)):
    real = getattr(Store, method)
    monkeypatch.setattr(Store, method, _stop_after(s3, after, real))
    with pytest.raises(RegistryError) as e:
      registry().register(tiny_export, "fashion")
    monkeypatch.setattr(Store, method, real)
    msg = str(e.value)
    assert msg.startswith(f"{root}/fashion: the registry store did not answer while registering")
    assert f"gave up after {ATTEMPTS} attempts (botocore 'standard' retries)" in msg
    assert "no version was listed" in msg and "Register again when it is back" in msg
    s3.start()
    assert registry().version_numbers("fashion") == []

  mv = registry().register(tiny_export, "fashion")  # the rerun, with the store back
  listed = registry().list_versions("fashion")
  assert [v.version for v in listed] == [mv.version] == [3]  # numbers 1 and 2 were claimed
  local = registry().open_version("fashion", "latest")  # downloads and re-hashes every artefact
  assert sorted(os.listdir(local)) == sorted([*listed[0].metadata["artifacts"], "version.json"])
  assert registry().resolve("fashion", "latest") == 3


def _watch_then_stop(server: StoppableS3, bucket: str, prefix: str, done) -> threading.Thread:
  """Stops the server as soon as the first shard appears under s3://bucket/prefix (polled from
  this process with its own client): the outage lands mid-way through the shard writes."""
  s3 = server.client()

  def watch():
    deadline = time.time() + 300
    while time.time() < deadline and not done():
      keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get(
          "Contents", [])]
      if any(k.endswith(".array_record") for k in keys):
        server.stop()
        return
      time.sleep(0.02)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


@pytest.mark.slow  # two Beam pipelines in .venv-beam
def test_s3_lost_while_beam_ingest_writes_shards_to_the_bucket(s3, tmp_path):
  assert os.access(BEAM_PY, os.X_OK), "needs the Beam env: bash scripts/setup_beam_env.sh"
  from jaxclf.data import data_cli  # noqa: PLC0415
  from jaxclf.data.sources import ingested  # noqa: PLC0415

  src = _noise_folder(str(tmp_path / "src"))
  assert data_cli.main(_ingest_args(src, str(tmp_path / "ref"))) == 0  # the local path
  ref = json.load(open(tmp_path / "ref" / ingested.MANIFEST))
  out = f"s3://{s3.bucket}/ds"
  cmd = [sys.executable, "-m", "jaxclf.data.data_cli", *_ingest_args(src, out), "--runner=direct"]

  proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  watcher = _watch_then_stop(s3, s3.bucket, "ds/", lambda: proc.poll() is not None)
  err = proc.communicate(timeout=300)[1]
  watcher.join(10)
  assert proc.returncode == 2, err[-3000:]
  line = last_line(err)
  assert line.startswith(f"error: {out}/"), line
  assert "the object store did not answer the upload" in line
  assert f"gave up after {ATTEMPTS} attempts (botocore 'standard' retries)" in line

  s3.start()
  keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])]
  assert f"ds/{ingested.MANIFEST}" not in keys  # nothing claims the shards that never landed
  done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f"ds/{ingested.MANIFEST}")[
      "Body"].read())
  assert got["version"] == ref["version"] and got["num_records"] == 60


# ----------------------------------------------------------------------------- GCS (an emulator)

class StoppableGcs:
  """gcp-storage-emulator (requirements/beam.txt, in .venv-beam) in its own process, storing on
  disk under `data_dir`, so that stopping the process and starting it again on the same port
  brings the same objects back."""

  def __init__(self, data_dir: str):
    from conftest import free_port  # noqa: PLC0415
    self.port, self.data_dir = free_port(), data_dir
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def start(self) -> None:
    from conftest import wait_for_http  # noqa: PLC0415
    os.makedirs(self.data_dir, exist_ok=True)
    self.proc = subprocess.Popen(
        [BEAM_PY, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
         str(self.port), "--default-bucket", "jaxclf-faults", "--quiet"],
        cwd=self.data_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(self.url + "/", self.proc, 60, "the GCS emulator did not start "
                  "(bash scripts/setup_beam_env.sh)")

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      self.proc.wait(30)


@pytest.mark.slow  # gcsfs's fixed retry schedule waits ~31 s before it gives up
def test_gcs_lost_while_ingest_reads_the_bucket(tmp_path, monkeypatch, capsys):
  assert os.access(BEAM_PY, os.X_OK), "needs the Beam env: bash scripts/setup_beam_env.sh"
  from jaxclf.data.sources import remote  # noqa: PLC0415

  gcs = StoppableGcs(str(tmp_path / "gcs"))
  gcs.start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
  try:
    fs = remote.gcs_filesystem()
    fs.put(_noise_folder(str(tmp_path / "src")) + "/", "jaxclf-faults/src", recursive=True)
    _ingest_survives_a_lost_store(gcs, "gs://jaxclf-faults/src/", tmp_path, monkeypatch, capsys,
                                  "gave up after 6 attempts (gcsfs's retries)")
  finally:
    gcs.stop()
