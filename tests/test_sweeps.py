"""Optuna sweeps on a tiny config: bad spaces fail first, crashes and pruning are recorded, only
validation reaches the sampler and the pruner, two workers share one study, resume and Ctrl-C.

The tiny trials (configs/cnn.py:tiny on 128 images per split, 2 epochs) cost ~8 s each here.
"""
import json
import os
import signal
import subprocess
import sys
import time

import optuna  # requirements/lock.txt: missing, the install is broken (an error, not a skip)
import pytest

from conftest import ROOT, free_port
from service_helpers import start_mlflow_server, stop

TINY = f'''
import importlib.util
spec = importlib.util.spec_from_file_location("c", {ROOT + "/configs/cnn.py"!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)

def get_config(arg=None):
  c = m.get_config("tiny")
  c.data.limit_per_split = 128
  c.train.calibrate = False
  c.train.keep_checkpoints = 1
  return c

def get_sweep(name):
  if name == "mixed":  # one crash (batch larger than the split), one hopeless lr, one good lr
    return {{"sampler": "grid", "seed": 0, "pruner": "asha",
             "space": {{"optimizer.learning_rate": {{"categorical": [0.05, 1e-6]}},
                       "train.batch_size": {{"categorical": [32, 4096]}}}}}}
  if name == "lr":  # three one-epoch trials that differ in the learning rate only
    return {{"sampler": "random", "trials": 3, "seed": 0, "set": {{"train.num_epochs": 1}},
             "space": {{"optimizer.learning_rate": {{"float": (0.01, 0.1), "log": True}}}}}}
  if name == "random":
    return {{"sampler": "random", "trials": 3, "seed": 0, "set": {{"train.num_epochs": 1}},
             "space": {{"optimizer.name": {{"categorical": ["sgd", "adamw"]}},
                       "optimizer.learning_rate": {{"float": (0.01, 0.1), "log": True}},
                       "optimizer.momentum": {{"float": (0.8, 0.95),
                                               "when": {{"optimizer.name": "sgd"}}}}}}}}
  if name == "bad_path":
    return {{"space": {{"optimizer.learnig_rate": {{"float": (0.01, 0.1)}}}}}}
  if name == "bad_range":
    return {{"space": {{"optimizer.learning_rate": {{"float": (0.5, 0.1)}}}}}}
  if name == "bad_bound":
    return {{"space": {{"optimizer.learning_rate": {{"float": (0.01, 500.0)}}}}}}
  if name == "bad_when":
    return {{"space": {{"optimizer.momentum": {{"float": (0.8, 0.9), "when": {{"opt": "sgd"}}}}}}}}
  raise ValueError(f"unknown sweep {{name!r}}")
'''


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  path = tmp_path_factory.mktemp("sweepcfg") / "tiny_sweep.py"
  path.write_text(TINY)
  return str(path)


def test_layering_tracking_and_config_stay_below_train_and_sweeps():
  code = ("import sys, jaxclf.tracking.run_record, jaxclf.tracking.compare, "
          "jaxclf.tracking.mlflow_bridge, jaxclf.config; "
          "bad = [m for m in sys.modules if m.startswith(('jaxclf.train', 'jaxclf.sweeps', "
          "'jaxclf.models', 'mlflow', 'optuna'))]; print(bad); sys.exit(bool(bad))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("sweep, message", [
    ("bad_path", "parameter 'optimizer.learnig_rate': unknown config key "
                 "'optimizer.learnig_rate'. Did you mean optimizer.learning_rate?"),
    ("bad_range", "space['optimizer.learning_rate']: low must be < high, got (0.5, 0.1)"),
    ("bad_bound", "optimizer.learning_rate: 500.0 is out of range"),
    ("bad_when", "'when' refers to 'opt', which is not another parameter"),
    ("nope", "get_sweep('nope'): unknown sweep 'nope'"),
])
def test_bad_search_space_fails_before_any_trial(tiny_config, tmp_path, capsys, sweep, message):
  from jaxclf.cli import main
  workdir = tmp_path / "s"
  assert main(["sweep", "--config", tiny_config, "--sweep", sweep, "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert message in err and "tiny_sweep.py" in err, err
  assert not (workdir / "study.journal").exists() and not (workdir / "trials").exists()


class Recorder:
  """Everything the sampler and the pruner are shown: the trials' values and intermediate values."""

  def __init__(self):
    self.seen = []

  def wrap_pruner(self, pruner):
    rec = self

    class Recording(type(pruner)):
      def prune(self, study, trial):
        rec.seen.extend(trial.intermediate_values.values())
        return super().prune(study, trial)
    recording = Recording.__new__(Recording)
    recording.__dict__.update(pruner.__dict__)
    return recording

  def wrap_sampler(self, sampler):
    rec, original = self, sampler.sample_relative

    def sample_relative(study, trial, space):
      for t in study.get_trials(deepcopy=False):
        rec.seen.extend(list(t.intermediate_values.values()) + list(t.values or []))
        rec.seen.extend(v for v in t.user_attrs.values() if isinstance(v, float))
      return original(study, trial, space)
    sampler.sample_relative = sample_relative
    return sampler


SENTINEL_TEST_ACCURACY = 0.123456789  # no val accuracy on 128 images can be this (k/128)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
  """A real `mlflow server` from .venv-mlflow (scripts/setup_mlflow_env.sh), sqlite backend."""
  d = tmp_path_factory.mktemp("mlflow")
  url, proc = start_mlflow_server(str(d), f"sqlite:///{d}/mlflow.db",
                                  ["--artifacts-destination", str(d / "artifacts")])
  try:
    yield url
  finally:
    stop(proc)


@pytest.fixture(scope="module")
def mixed_sweep(tiny_config, tmp_path_factory, mlflow_server):
  """The 'mixed' grid, run once in-process, with a poisoned test metric and a recording sampler
  and pruner, logging every trial to a real MLflow server."""
  from jaxclf.sweeps import study as study_mod
  from jaxclf.train import loop
  mp = pytest.MonkeyPatch()
  rec = Recorder()
  real_final, real_pruner, real_sampler = (loop._final_evaluation, study_mod.create_pruner,
                                           study_mod.create_sampler)

  def poisoned_final(*a, **kw):
    metrics, calibration = real_final(*a, **kw)
    metrics["test"] = {**metrics["test"], "accuracy": SENTINEL_TEST_ACCURACY}
    return metrics, calibration
  mp.setattr(loop, "_final_evaluation", poisoned_final)
  mp.setattr(study_mod, "create_pruner", lambda name: rec.wrap_pruner(real_pruner(name)))
  mp.setattr(study_mod, "create_sampler", lambda n, s: rec.wrap_sampler(real_sampler(n, s)))
  workdir = tmp_path_factory.mktemp("mixed") / "s"
  from jaxclf.cli import main
  t0 = time.time()
  try:
    rc = main(["sweep", "--config", tiny_config, "--sweep", "mixed", "--workdir", str(workdir),
               "--set", f"tracking.mlflow_uri={mlflow_server}"])
  finally:
    mp.undo()
  return {"rc": rc, "workdir": workdir, "seen": rec.seen, "wall": time.time() - t0,
          "mlflow": mlflow_server}


def test_crashes_fail_with_reason_pruned_trials_keep_metrics_best_by_val(mixed_sweep):
  assert mixed_sweep["rc"] == 0
  summary = json.loads((mixed_sweep["workdir"] / "summary.json").read_text())
  by = {(r["params"]["optimizer.learning_rate"], r["params"]["train.batch_size"]): r
        for r in summary["trials"]}
  assert len(by) == 4 and summary["counts"]["FAIL"] == 2
  for lr in (0.05, 1e-6):  # the crashing trials: failed with the reason; the others finished
    assert by[(lr, 4096)]["state"] == "FAIL"
    assert "larger than the train split" in by[(lr, 4096)]["reason"]
  good, hopeless = by[(0.05, 32)], by[(1e-6, 32)]
  assert good["state"] == "COMPLETE"
  assert hopeless["state"] in ("COMPLETE", "PRUNED")
  if hopeless["state"] == "PRUNED":  # recorded with its last metrics
    run = json.loads((mixed_sweep["workdir"] / hopeless["run_dir"] / "run.json").read_text())
    assert run["status"] == "pruned" and hopeless["val_accuracy"] is not None
    assert hopeless["epochs"] == len(run["history"]) < 2
  best = summary["best"]
  complete = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
  assert best["val_accuracy"] == max(r["val_accuracy"] for r in complete)
  assert best["reproduce"].startswith("jaxclf train --config ")
  assert f"--set optimizer.learning_rate={best['params']['optimizer.learning_rate']}" in \
      best["reproduce"]
  assert best["config"]["optimizer"]["learning_rate"] == best["params"]["optimizer.learning_rate"]
  assert best["test_of_best_trial_only"]["accuracy"] == SENTINEL_TEST_ACCURACY
  assert "never used for selection" in best["test_of_best_trial_only"]["note"]
  # TensorBoard HParams: each trial declares the val metrics as the experiment's metrics
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  from tensorboard.plugins.hparams import metadata
  events = EventAccumulator(str(mixed_sweep["workdir"] / best["run_dir"] / "tb"))
  events.Reload()
  experiment = metadata.parse_experiment_plugin_data(
      events.SummaryMetadata("_hparams_/experiment").plugin_data.content)
  assert [m.name.tag for m in experiment.metric_infos] == ["val/accuracy", "val/loss"]
  assert "optimizer.learning_rate" in {h.name for h in experiment.hparam_infos}
  md = (mixed_sweep["workdir"] / "summary.md").read_text()
  assert md.count("test accuracy") == 1 and "not used for selection" in md


def test_each_trial_is_an_mlflow_run_with_params_metrics_tags_artifacts(mixed_sweep):
  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri=mixed_sweep["mlflow"])
  runs = client.search_runs([client.get_experiment_by_name("cnn_tiny").experiment_id])
  summary = json.loads((mixed_sweep["workdir"] / "summary.json").read_text())
  trained = [r for r in summary["trials"] if r["state"] != "FAIL"]
  by_trial = {r.data.tags.get("trial"): r for r in runs}
  for row in trained:
    run = by_trial[str(row["trial"])]
    record = json.loads((mixed_sweep["workdir"] / row["run_dir"] / "run.json").read_text())
    assert record["mlflow"]["run_id"] == run.info.run_id
    assert run.data.params["optimizer.learning_rate"] == str(
        row["params"]["optimizer.learning_rate"])
    assert run.data.params["train.batch_size"] == "32"
    assert run.data.tags["sweep"] == "mixed"
    assert run.data.tags["dataset_version"] == record["dataset"]["version"]
    assert run.data.tags["git_commit"] == (record["git"]["commit"] or "")
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [
        (h["epoch"], h["val_accuracy"]) for h in record["history"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "run.json"} <= artifacts
    assert run.info.status == "FINISHED"
  crashed = [r for r in runs if r.info.status == "FAILED"]
  assert len(crashed) == 2  # the crashing trials are MLflow runs too, marked failed


def test_no_test_metric_reaches_the_sampler_or_the_pruner(mixed_sweep):
  seen = mixed_sweep["seen"]
  assert seen, "the recording sampler/pruner saw nothing: the probe is broken"
  assert SENTINEL_TEST_ACCURACY not in seen
  study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(mixed_sweep["workdir"] / "study.journal"))))
  stored = json.dumps([(t.values, t.intermediate_values, t.user_attrs, t.system_attrs)
                       for t in study.trials], default=str)
  assert str(SENTINEL_TEST_ACCURACY) not in stored
  for t in study.trials:  # what was reported is exactly the val history of the run
    if t.intermediate_values:
      run = json.loads((mixed_sweep["workdir"] / t.user_attrs["run_dir"] / "run.json").read_text())
      assert list(t.intermediate_values.values()) == [h["val_accuracy"] for h in run["history"]]


def test_resume_skips_finished_trials(mixed_sweep, capsys):
  from jaxclf.cli import main
  before = {p: os.path.getmtime(p) for p in mixed_sweep["workdir"].glob("trials/*/run.json")}
  assert main(["sweep", "--resume", str(mixed_sweep["workdir"])]) == 0
  after = {p: os.path.getmtime(p) for p in mixed_sweep["workdir"].glob("trials/*/run.json")}
  assert before == after and "best trial" in capsys.readouterr().out


def test_runs_compare_writes_table_png_and_html(mixed_sweep, tmp_path, capsys):
  from jaxclf.cli import main
  html, png = tmp_path / "compare.html", tmp_path / "curves.png"
  trials = str(mixed_sweep["workdir"] / "trials" / "*")
  assert main(["runs", "compare", trials, "--html", str(html), "--png", str(png), "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert {r["hparams"]["optimizer.learning_rate"] for r in rows} >= {0.05}
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  page = html.read_text()
  assert "optimizer.learning_rate" in page and "data:image/png;base64," in page
  assert "http://" not in page and "https://" not in page  # self-contained
  assert main(["runs", "list", str(mixed_sweep["workdir"]), "--sort", "val_accuracy"]) == 0
  listing = capsys.readouterr().out
  assert listing.splitlines()[0].split()[:4] == ["run", "status", "epochs", "val_acc"]


def test_compare_page_renders_in_headless_chromium(mixed_sweep, tmp_path):
  from jaxclf.tracking.compare import curves_png, html_page, load_runs
  from test_report import Chromium  # the evaluation report's DevTools driver
  rows = load_runs(sorted(str(p) for p in (mixed_sweep["workdir"] / "trials").iterdir()))
  page = tmp_path / "compare.html"
  page.write_text(html_page(rows, curves_png(rows)))
  browser = Chromium()
  try:
    info = browser.inspect(page.as_uri())
  finally:
    browser.close()
  assert not info["console_errors"] and not info["exceptions"] and not info["failed_requests"]
  assert all(u.startswith(("file:", "data:")) for u in info["requests"]), info["requests"]
  assert [s["id"] for s in info["sections"]] == ["metrics", "curves", "shared"]
  assert all(s["height"] > 20 for s in info["sections"])
  assert info["images"] and all(i["ok"] and i["width"] > 300 for i in info["images"])


# 40 s of two real worker processes; bench/sweep.py runs the same path every time it measures.
@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(tiny_config, tmp_path):
  """Optuna's distributed pattern on this machine: two processes, one journal-file study."""
  from jaxclf.sweeps import runner
  workdir = tmp_path / "shared"
  runner.prepare(tiny_config, "random", str(workdir))
  # tracking never kills training: an unreachable MLflow server is one warning, trials go on
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
         "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
  procs = [subprocess.Popen([sys.executable, "-m", "jaxclf.cli", "sweep", "--resume", str(workdir),
                             "--worker", "--worker-index", str(i), "--threads", "1"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errs
  assert all("MLflow tracking server" in e and "unreachable" in e for e in errs), errs
  study = runner.open_study(runner.load_plan(str(workdir)), str(workdir))
  trials = study.trials
  assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
  workers = [t.user_attrs["worker"] for t in trials]
  assert len(set(workers)) == 2, workers  # both processes took trials
  assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3  # seeds differ
  for t in trials:  # every trial ran exactly once, in its own directory
    attempts = (workdir / t.user_attrs["run_dir"] / "trial.json").read_text().splitlines()
    assert len(attempts) == 1 and json.loads(attempts[0])["worker"] == t.user_attrs["worker"]
    run = json.loads((workdir / t.user_attrs["run_dir"] / "run.json").read_text())
    assert run["status"] == "completed" and len(run["segments"]) == 1


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_sweep_and_dead_workers_are_retried(tiny_config, tmp_path):
  """SIGINT mid-trial -> exit 130, trial marked interrupted; --resume continues it from its
  checkpoint. A RUNNING trial whose heartbeat went quiet (a dead worker) is retried too."""
  from jaxclf.sweeps import runner, study as study_mod
  workdir = tmp_path / "s"
  # 50 epochs of 4 steps: a trial lasts seconds, far longer than the 0.2 s poll below, so the
  # SIGINT lands mid-trial on any machine. With 3 epochs a warm compilation cache let the whole
  # sweep (about 3 s of compute) end before the signal arrived.
  runner.prepare(tiny_config, "mixed", str(workdir), overrides=["train.num_epochs=50"])
  proc = subprocess.Popen([sys.executable, "-m", "jaxclf.cli", "sweep", "--resume", str(workdir)],
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:  # wait for a trial's first committed checkpoint
    # (a step folder named by its number alone: Orbax's temporary folders carry a suffix). Its
    # run.json's history can show an epoch before that epoch's checkpoint is committed, and a
    # SIGINT then would leave nothing to resume from.
    if any(d.name.isdigit() for d in workdir.glob("trials/*/checkpoints/latest/*")):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 130, out
  study = runner.open_study(runner.load_plan(str(workdir)), str(workdir))
  interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
  assert len(interrupted) == 1
  # a dead worker: a trial left RUNNING with an old heartbeat
  dead = study.ask()
  study._storage.set_trial_user_attr(dead._trial_id, "run_dir", "trials/trial_dead")
  os.makedirs(study_mod.trial_dir(str(workdir), study._storage.get_trial(dead._trial_id)))
  assert study_mod.fail_stale_trials(study, str(workdir), grace_s=-1) == [dead.number]
  from jaxclf.cli import main
  assert main(["sweep", "--resume", str(workdir)]) == 0
  run = json.loads((workdir / interrupted[0].user_attrs["run_dir"] / "run.json").read_text())
  assert run["resumed_from_step"] and run["status"] in ("completed", "pruned")
  states = {t.number: t.state.name for t in runner.open_study(runner.load_plan(str(workdir)),
                                                               str(workdir)).trials}
  assert "RUNNING" not in states.values() and "WAITING" not in states.values()


def test_a_trial_that_trained_every_epoch_is_never_marked_pruned():
  """ASHA may rank a finished trial low, but pruning after the last epoch saves nothing: the
  trial is COMPLETE with its metrics. Before the last epoch the pruner decides."""
  import optuna
  from jaxclf.sweeps.objective import _pruning_callback
  study = optuna.create_study(direction="maximize",
                              pruner=optuna.pruners.ThresholdPruner(lower=0.99))
  trial = study.ask()
  on_epoch = _pruning_callback(trial, "val_accuracy", num_epochs=3)
  assert on_epoch({"epoch": 1, "val_accuracy": 0.5}) == "pruned"
  assert on_epoch({"epoch": 3, "val_accuracy": 0.5}) is None
  assert trial.user_attrs["last_epoch"] == {"epoch": 3, "val_accuracy": 0.5}


@pytest.mark.parametrize("option, value, message", [
    ("--sampler", "tpe", "--sampler 'tpe' with --resume: {w} is a sweep with sampler 'grid'"),
    ("--pruner", "median", "--pruner 'median' with --resume: {w} is a sweep with pruner 'asha'"),
    ("--storage", "postgresql://u@127.0.0.1/db",
     "--storage 'postgresql://u@127.0.0.1/db' with --resume: {w} is a sweep with storage the "
     "journal file"),
    ("--set", "train.num_epochs=9", "--set ['train.num_epochs=9'] with --resume"),
    ("--config", "configs/cnn.py", "--config with --resume"),
])
def test_resume_refuses_an_option_it_cannot_apply(mixed_sweep, capsys, option, value, message):
  from jaxclf.cli import main
  w = str(mixed_sweep["workdir"])
  plan = (mixed_sweep["workdir"] / "sweep.json").read_text()
  assert main(["sweep", "--resume", w, option, value]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message.format(w=w) in err, err
  assert (mixed_sweep["workdir"] / "sweep.json").read_text() == plan  # nothing changed


def test_resume_takes_a_new_trial_budget_and_the_options_it_already_has(mixed_sweep, tmp_path):
  import shutil
  from jaxclf.cli import main
  from jaxclf.sweeps import runner
  w = tmp_path / "copy"
  shutil.copytree(mixed_sweep["workdir"], w)
  # the same sampler/pruner as recorded is no change; a smaller budget: no new trial runs
  assert main(["sweep", "--resume", str(w), "--trials", "3", "--pruner", "asha",
               "--sampler", "grid"]) == 0
  assert json.loads((w / "sweep.json").read_text())["sweep"]["trials"] == 3
  assert len(runner.open_study(runner.load_plan(str(w)), str(w)).trials) == 4


# A real MLflow server of its own (stopped mid-run) and three tiny epochs: over a minute here.
@pytest.mark.slow
def test_mlflow_server_lost_mid_run_is_one_warning_and_the_run_record_is_complete(
    tiny_config, tmp_path, caplog):
  from jaxclf.config import load_config
  from jaxclf.tracking.tracked_run import train_with_tracking
  from service_helpers import start_mlflow_server, stop
  url, proc = start_mlflow_server(str(tmp_path), f"sqlite:///{tmp_path}/mlflow.db",
                                  ["--artifacts-destination", str(tmp_path / "artifacts")])
  config = load_config(tiny_config, [f"tracking.mlflow_uri={url}", "train.num_epochs=3"])
  workdir = tmp_path / "run"

  def lose_the_server(entry):  # after epoch 1 reached MLflow
    if entry["epoch"] == 1:
      stop(proc)
  try:
    with caplog.at_level("WARNING", logger="jaxclf.mlflow"):
      record = train_with_tracking(config, str(workdir), epoch_callback=lose_the_server)
  finally:
    stop(proc)
  warnings = [r.getMessage() for r in caplog.records if r.name == "jaxclf.mlflow"]
  assert len(warnings) == 1 and "training goes on without MLflow" in warnings[0], warnings
  run = json.loads((workdir / "run.json").read_text())
  assert record["status"] == run["status"] == "completed"
  assert [h["epoch"] for h in run["history"]] == [1, 2, 3]
  assert all(h["val_accuracy"] is not None for h in run["history"])
  assert run["metrics"]["val"]["accuracy"] is not None
  assert run["metrics"]["test"]["accuracy"] is not None
  assert run["mlflow"]["run_id"] == json.loads((workdir / "mlflow.json").read_text())["run_id"]
  assert (workdir / "config.json").exists() and list((workdir / "checkpoints").iterdir())


def test_a_postgresql_url_without_a_driver_gets_psycopg_3_and_grace_is_checked(capsys):
  from jaxclf.cli import main
  from jaxclf.sweeps.study import heartbeat_interval, sqlalchemy_url
  assert sqlalchemy_url("postgresql://u:p@db:5432/optuna") == \
      "postgresql+psycopg://u:p@db:5432/optuna"
  assert sqlalchemy_url("postgresql+psycopg2://u@db/o") == "postgresql+psycopg2://u@db/o"
  assert sqlalchemy_url("sqlite:///s.db") == "sqlite:///s.db"
  assert heartbeat_interval(60) == 10 and heartbeat_interval(15) == 5
  with pytest.raises(SystemExit) as e:
    main(["sweep", "--config", "c.py", "--sweep", "s", "--workdir", "w", "--grace", "5"])
  assert e.value.code == 2 and "argument --grace: '5': give seconds, at least 15" in \
      capsys.readouterr().err


def test_a_storage_url_with_a_password_is_refused_before_anything_is_written(tiny_config,
                                                                              tmp_path):
  """sweep.json keeps --storage on the shared workdir: a password in the URL would be kept there
  too, so it is one error naming the option (password masked), and nothing is written."""
  from jaxclf.sweeps import runner, space
  with pytest.raises(space.SpaceError) as e:
    runner.prepare(tiny_config, "mixed", str(tmp_path / "s"),
                   storage="postgresql://optuna:s3cret@db:5432/optuna")
  message = str(e.value)
  assert message.startswith("--storage postgresql://optuna:***@db:5432/optuna: the URL holds a "
                            "password") and "PGPASSWORD" in message and "s3cret" not in message
  assert not (tmp_path / "s").exists()
