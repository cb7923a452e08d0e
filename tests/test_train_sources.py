"""Training from the user's own images: a class-per-folder directory with bad files in it, clear
errors for bad paths, and an ingested dataset read straight from S3 (moto server on 127.0.0.1)."""
import json
import os
import subprocess
import sys

import pytest

import corpus
from jaxclf.config import load_config
from jaxclf.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.name=cnn_tiny", "train.batch_size=8", "train.num_epochs=1", "train.eval_batch_size=16",
         "periodic.log=2 steps", "data.val_fraction=0.2", "data.test_fraction=0.2",
         "train.progress_bar=false", "data.limit_per_split=0"]


def folder_config(source, extra=()):
  return load_config(f"{ROOT}/configs/cnn.py", overrides=[f"data.source={source}", *SMALL, *extra],
                     environ={})


def test_corrupt_images_are_skipped_listed_and_training_continues(tmp_path):
  photos = tmp_path / "photos"
  corpus.write_class_folder(str(photos), {"bag": 12, "shoe": 12}, size=(32, 32), fmt="JPEG", ext=".jpg")
  bad = corpus.bad_items()
  paths = corpus.write_corpus(str(photos / "shoe"), bad)
  record = train_and_evaluate(folder_config(photos), str(tmp_path / "run"))
  assert record["status"] == "completed"
  report = json.load(open(tmp_path / "run" / "data_report.json"))
  skipped = {os.path.basename(s["path"]): s for s in report["skipped"]}
  assert set(skipped) == {os.path.basename(p) for p in paths}
  assert all(s["reason"] and s["stage"] for s in skipped.values())
  counts = report["splits"]
  assert sum(c["count"] for c in counts.values()) == 24  # every good image was used


def _cli(args, cwd):
  return subprocess.run([sys.executable, "-m", "jaxclf.cli", "train", *args], capture_output=True,
                        text=True, cwd=cwd, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("case", ["missing", "empty_class", "typo"])
def test_bad_setup_gives_one_clear_line_before_compute(tmp_path, case):
  photos = tmp_path / "photos"
  corpus.write_class_folder(str(photos), {"bag": 4, "shoe": 4}, size=(16, 16))
  args = ["--config", f"{ROOT}/configs/cnn.py", "--workdir", str(tmp_path / "run")]
  if case == "missing":
    args += ["--set", f"data.source={tmp_path}/nope"]
    expect = f"data.source: '{tmp_path}/nope' does not exist"
  elif case == "empty_class":
    os.makedirs(photos / "hat")
    args += ["--set", f"data.source={photos}"]
    expect = "hat"
  else:
    args += ["--set", "train.batchsize=3"]
    expect = "unknown config key 'train.batchsize'. Did you mean train.batch_size?"
  out = _cli(args, ROOT)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith("jaxclf: error:")]
  assert len(lines) == 1 and expect in lines[0], out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing was computed


def test_train_reads_an_ingested_dataset_from_s3(tmp_path, s3_bucket):
  from jaxclf.data import ingest
  s3, name = s3_bucket
  photos = tmp_path / "photos"
  corpus.write_class_folder(str(photos), {"bag": 10, "shoe": 10}, size=(28, 28), fmt="PNG")
  out = tmp_path / "ds"
  manifest = ingest.ingest(str(photos), ingest.IngestOptions(out=str(out), val_fraction=0.2,
                                                             test_fraction=0.2))
  for dirpath, _, files in os.walk(out):
    for f in files:
      p = os.path.join(dirpath, f)
      s3.upload_file(p, name, "ds/" + os.path.relpath(p, out))
  cfg = folder_config(f"s3://{name}/ds", ["data.cache_dir=" + str(tmp_path / "cache")])
  record = train_and_evaluate(cfg, str(tmp_path / "run"))
  assert record["status"] == "completed"
  assert record["dataset"]["version"] == manifest["version"]
  assert record["metrics"]["test"]["count"] == manifest["splits"]["test"]["count"]
