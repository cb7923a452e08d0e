"""The Optuna study behind a sweep: storage, sampler and pruner by name, dead-worker recovery.

Storage: a journal file `<workdir>/study.journal` (optuna.storages.JournalStorage with
JournalFileBackend) by default, which Optuna supports for several processes on one machine or on a
shared filesystem; or an RDB URL (postgresql://..., for many machines). SQLite works for one
process but is not safe for concurrent workers (Optuna's FAQ).

Dead workers: a worker that died leaves its trial RUNNING. With an RDB URL, Optuna's own heartbeat
(RDBStorage heartbeat_interval + grace_period) fails such trials and
RetryHeartbeatStaleTrialCallback (Optuna 5's name for RetryFailedTrialCallback) enqueues them
again. The journal backend has no heartbeat, so each worker touches `<trial dir>/heartbeat` on the
same interval and `fail_stale_trials` below does the same thing by that file's age. Either way the
retry runs in the original trial's directory and resumes from its checkpoint. The grace period
is the sweep's `grace_s` (sweep.json, `jaxclf sweep --grace`), GRACE_S by default.
"""
from __future__ import annotations

import os
import time
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

HEARTBEAT_S = 10
GRACE_S = 60
MAX_RETRY = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def create_storage(workdir: str, url: str | None = None, grace_s: float = GRACE_S):
  if not url:
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    path = os.path.join(workdir, "study.journal")
    os.makedirs(workdir, exist_ok=True)
    # The open()-based lock works on NFS-like shared filesystems too (no symlinks needed).
    return optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))
  if url.startswith(("sqlite", "postgresql", "mysql")):
    import warnings
    with warnings.catch_warnings():  # the heartbeat is experimental in Optuna 5, and documented
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      return optuna.storages.RDBStorage(
          sqlalchemy_url(url), heartbeat_interval=heartbeat_interval(grace_s),
          grace_period=int(grace_s), heartbeat_stale_trial_callback=_retry_callback())
  raise ValueError(f"--storage {url!r}: expected an RDB URL (postgresql://, mysql://, sqlite:///) "
                   "or nothing for the journal file")


def heartbeat_interval(grace_s: float) -> int:
  """A worker beats at least three times per grace period, so one late beat is not death."""
  return max(1, min(HEARTBEAT_S, int(grace_s) // 3))


def sqlalchemy_url(url: str) -> str:
  """`postgresql://` means psycopg2 to SQLAlchemy; the lock ships psycopg 3 (its binary wheel,
  requirements/sweeps.txt), so a URL without a driver gets that one."""
  if url.startswith(("postgresql://", "postgres://")):
    return "postgresql+psycopg://" + url.split("://", 1)[1]
  return url


def _retry_callback():
  import warnings
  with warnings.catch_warnings():  # experimental in Optuna 5, and the documented way
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)


def create_sampler(name: str, sweep: dict[str, Any]):
  seed = int(sweep["seed"])
  if name == "grid":
    space = {k: list(p["categorical"]) for k, p in sweep["space"].items()}
    return optuna.samplers.GridSampler(space, seed=seed)
  if name == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  if name == "tpe":
    # multivariate + group: TPE models the conditional (when) parameters jointly.
    with __import__("warnings").catch_warnings():
      __import__("warnings").simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, sweep["trials"]),
                                        multivariate=True, group=True)
  raise ValueError(f"unknown sampler {name!r}")


def create_pruner(name: str):
  if name in ("none", None):
    return optuna.pruners.NopPruner()
  if name == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
  if name == "asha":
    # Asynchronous successive halving: rung at epoch 1, 3, 9, ... keeps the top 1/3.
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
  raise ValueError(f"unknown pruner {name!r}")


def create_study(workdir: str, sweep: dict[str, Any], study_name: str, storage_url: str | None,
                 sampler: str, pruner: str, direction: str,
                 grace_s: float = GRACE_S) -> optuna.Study:
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  return optuna.create_study(
      study_name=study_name, storage=create_storage(workdir, storage_url, grace_s),
      sampler=create_sampler(sampler, sweep), pruner=create_pruner(pruner),
      direction=direction, load_if_exists=True)


def original_number(trial) -> int:
  """The number of the first trial of a retry chain: its directory holds the checkpoints."""
  attrs = getattr(trial, "system_attrs", None)  # a FrozenTrial; a live Trial asks its storage
  if attrs is None:
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
  return int(attrs.get("failed_trial", trial.number))


def retried_numbers(study: optuna.Study) -> set[int]:
  return {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get(
      "retry_history", [])}


def budget_used(study: optuna.Study) -> int:
  """Trials that count against the budget: every trial but the ones a retry replaced."""
  replaced = retried_numbers(study)
  return sum(1 for t in study.get_trials(deepcopy=False) if t.number not in replaced)


class StopAtBudget:
  """optuna.study.MaxTrialsCallback, counting a retried trial once."""

  def __init__(self, n_trials: int):
    self.n_trials = n_trials

  def __call__(self, study: optuna.Study, trial) -> None:
    if budget_used(study) >= self.n_trials:
      study.stop()


def retry(study: optuna.Study, trial, reason: str) -> None:
  """Fails a trial that will never finish (dead worker, Ctrl-C) and enqueues it again."""
  if trial.state == TrialState.RUNNING:
    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trial = study._storage.get_trial(trial._trial_id)
  _retry_callback()(study, trial)


def fail_stale_trials(study: optuna.Study, workdir: str, grace_s: float = GRACE_S) -> list[int]:
  """RUNNING trials whose worker went quiet are failed and enqueued again. An RDB storage has
  Optuna's own heartbeat (a row per trial); the journal backend's is `<trial dir>/heartbeat`."""
  from optuna.storages import RDBStorage
  if isinstance(getattr(study._storage, "_backend", study._storage), RDBStorage):
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    optuna.storages.fail_stale_trials(study)  # Optuna runs it only as a new trial starts
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(before & failed)
  stale = []
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    beat = os.path.join(trial_dir(workdir, t), "heartbeat")
    age = time.time() - (os.path.getmtime(beat) if os.path.exists(beat)
                         else t.datetime_start.timestamp())
    if age > grace_s:
      retry(study, t, f"worker stopped: no heartbeat for {age:.0f}s")
      stale.append(t.number)
  return stale


def wait_for_running(study: optuna.Study, workdir: str, grace_s: float = GRACE_S,
                     on_wait=None) -> list[int]:
  """Blocks until no trial is RUNNING: each one either finishes (its worker is alive, maybe on
  another machine) or goes quiet past the grace period and is failed and enqueued again.
  Returns the numbers of the trials failed as stale."""
  stale: list[int] = []
  while True:
    stale += fail_stale_trials(study, workdir, grace_s)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
      return stale
    if on_wait is not None:
      on_wait([t.number for t in running])
    time.sleep(heartbeat_interval(grace_s))


def resume_interrupted(study: optuna.Study) -> list[int]:
  """Trials stopped by Ctrl-C (recorded FAIL with interrupted=True) are enqueued again, once."""
  replaced = retried_numbers(study)
  out = []
  for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
    if t.user_attrs.get("interrupted") and t.number not in replaced:
      retry(study, t, "interrupted")
      out.append(t.number)
  return out


def trial_dir(workdir: str, trial) -> str:
  return os.path.join(workdir, "trials", f"trial_{original_number(trial):04d}")
