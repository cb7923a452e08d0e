"""Options are honoured or refused, never accepted and ignored:

  jaxclf serve --protect-ops          with no API key: refused (it would protect nothing)
  jaxclf runs list|compare --sort X   X not a column: refused, naming the columns
  jaxclf data ingest --runner R ...   reruns itself in .venv-beam with every ingest option
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXCLF_SERVE_")}
  return {**env, "PYTHONPATH": str(REPO), **extra}


# ---------------------------------------------------------------- serve --protect-ops

@pytest.mark.parametrize("how", ["flag", "environment"])
def test_protect_ops_without_an_api_key_is_refused(tmp_path, how):
  args = ["--protect-ops"] if how == "flag" else []
  env = clean_env() if how == "flag" else clean_env(JAXCLF_SERVE_PROTECT_OPS="true")
  r = subprocess.run([sys.executable, "-m", "serving.predict_cli", "serve", "--model-path",
                      str(tmp_path), *args], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "protect_ops (--protect-ops, JAXCLF_SERVE_PROTECT_OPS) needs an API " \
      "key" in lines[0], r.stderr


def test_protect_ops_with_a_key_from_any_source_is_accepted(tmp_path):
  from serving.settings import load_settings
  keys = tmp_path / "keys"
  keys.write_text("ops k-123\n")
  for env, overrides in (({"JAXCLF_SERVE_API_KEY": "k"}, {}),
                         ({"JAXCLF_SERVE_API_KEYS": "a,b"}, {}),
                         ({}, {"api_keys_file": str(keys)})):
    s = load_settings({"protect_ops": True, **overrides}, environ=env)
    assert s.protect_ops
  with pytest.raises(ValueError, match="protect_ops"):
    load_settings({"protect_ops": True}, environ={})


# ---------------------------------------------------------------- runs --sort

def test_runs_sort_by_an_unknown_column_is_refused(tmp_path):
  r = subprocess.run([sys.executable, "-m", "jaxclf.cli", "runs", "list", str(tmp_path), "--sort",
                      "val_acc"], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert "argument --sort: invalid choice: 'val_acc'" in r.stderr
  assert "val_accuracy" in r.stderr and "duration_s" in r.stderr
  from jaxclf.tracking.compare import load_runs
  with pytest.raises(ValueError, match=r"--sort 'val_acc': not a sortable column; one of "
                                       r"val_accuracy, test_accuracy"):
    load_runs([str(tmp_path)], sort="val_acc")


def test_runs_sort_orders_by_each_column(tmp_path):
  from jaxclf.tracking.compare import SORT_KEYS, load_runs
  values = {"a": (0.5, 0.9, 3.0), "b": (0.7, 0.2, 1.0), "c": (0.6, 0.4, 2.0)}
  for name, (acc, loss, secs) in values.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "run.json").write_text(json.dumps({
        "metrics": {"val": {"accuracy": acc, "loss": loss}, "test": {"accuracy": acc}},
        "duration_s": secs, "history": [{"epoch": 1}] * int(secs)}))
  paths = [str(tmp_path / n) for n in values]
  want = {"val_accuracy": "bca", "test_accuracy": "bca", "val_loss": "bca", "duration_s": "bca",
          "epochs": "bca"}
  for key in SORT_KEYS:
    got = "".join(Path(r["run"]).name for r in load_runs(paths, sort=key))
    assert got == want[key], key


# ---------------------------------------------------------------- data ingest --runner

INGEST_ARGS = {  # every ingest option, each away from its default
    "--name": "shoes", "--license": "CC-BY-4.0", "--description": "a test set",
    "--val-fraction": "0.2", "--test-fraction": "0.15", "--seed": "7", "--channels": "1",
    "--max-pixels": "1000000", "--shard-mb": "8.0", "--workers": "3", "--http-timeout": "12.0",
    "--http-retries": "5", "--http-concurrency": "2", "--tfds-data-dir": "/srv/tfds",
    "--index": "json",
}
INGEST_FLAGS = ["--force", "--no-near-duplicates"]


def ingest_parser():
  from jaxclf.data.data_cli import add_data_commands
  parser = argparse.ArgumentParser(prog="jaxclf")
  add_data_commands(parser.add_subparsers(dest="command", required=True))
  return parser


def test_ingest_option_list_covers_the_parser():
  """A new ingest option must be added to INGEST_ARGS/INGEST_FLAGS (and so to the rerun check)."""
  parser = ingest_parser()
  sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  ingest = next(a for a in sub.choices["data"]._actions
                if isinstance(a, argparse._SubParsersAction)).choices["ingest"]
  options = {o for a in ingest._actions for o in a.option_strings if o.startswith("--")}
  assert options - {"--help", "--out", "--runner"} == set(INGEST_ARGS) | set(INGEST_FLAGS)


def test_ingest_with_a_runner_reruns_in_the_beam_env_with_every_option(tmp_path, monkeypatch):
  """The rerun in .venv-beam (here a stand-in interpreter that records its arguments) gets every
  option the user gave, so `--workers` and `--tfds-data-dir` reach the Beam ingest too."""
  from jaxclf.data.data_cli import parse
  calls = tmp_path / "argv.json"
  beam = tmp_path / "beam-python"
  beam.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"json.dump(sys.argv[1:], open({str(calls)!r}, 'w'))\n")
  beam.chmod(0o755)
  monkeypatch.setenv("JAXCLF_BEAM_PYTHON", str(beam))
  argv = ["data", "ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
          "--runner", "direct", *[x for kv in INGEST_ARGS.items() for x in kv], *INGEST_FLAGS,
          "--direct_num_workers=2"]
  from jaxclf.cli import main
  assert main(argv) == 0
  rerun = json.loads(calls.read_text())
  assert rerun[:2] == ["-m", "jaxclf.data.data_cli"]
  given = vars(parse(ingest_parser(), argv))
  got = vars(parse(ingest_parser(), rerun[2:]))
  assert {k: v for k, v in got.items() if k != "func"} == \
      {k: v for k, v in given.items() if k != "func"}
  assert (got["workers"], got["tfds_data_dir"]) == (3, "/srv/tfds")
  assert got["pipeline_args"] == ["--direct_num_workers=2"]
