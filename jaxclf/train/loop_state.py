"""The training loop's own state, saved as JSON beside the TrainState in every checkpoint.

Typed and versioned, so that renaming a field is a new version with a reader for the old one
instead of a silently broken resume. Version 0 is the untyped `meta` dict that checkpoints held
before the loop state was typed (tests/fixtures/checkpoint_before_loop_state is one); it still resumes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

VERSION = 1


@dataclasses.dataclass
class LoopState:
  version: int = VERSION
  # Validation results in order: {epoch, step, val_loss, val_accuracy, train_loss, wall_time}.
  history: list = dataclasses.field(default_factory=list)
  # Best by validation so far: {step, epoch, metric, value, val} (None before the first one).
  best: dict | None = None
  bad_checks: int = 0  # early-stopping checks since `best` last improved
  plateau_best: float | None = None  # reduce-on-plateau: best val loss, checks since it
  plateau_bad: int = 0
  last_train: dict | None = None  # the latest logged train metrics (train loss, img/s, ...)
  # The Grain iterator position inside epoch `iter_epoch` (None: the step says it all, as on the
  # in-memory path or at an epoch boundary).
  iter_state: Any = None
  iter_epoch: int | None = None
  # Who saved it: distributed.topology() (process_count, device_count, mesh); a checkpoint resumes
  # only with the same process count (None: written before multi-process training existed).
  topology: dict | None = None
  # Not saved: set when a version-0 checkpoint was taken before its step's epoch-end actions ran
  # (the old loop saved mid-epoch checkpoints before validating), so resuming runs them first.
  resume_pending: bool = dataclasses.field(default=False, compare=False)

  def to_json(self) -> dict[str, Any]:
    """A JSON object (dict of JSON types), what the checkpoint stores."""
    d = dataclasses.asdict(self)
    d.pop("resume_pending")
    return d

  @classmethod
  def from_json(cls, data: dict[str, Any], *, step: int, steps_per_epoch: int) -> "LoopState":
    """Reads any version. `step` (the restored TrainState's) and `steps_per_epoch` place a
    version-0 dict's epoch counter on the step axis."""
    if not isinstance(data, dict):
      raise ValueError(f"checkpoint loop state: expected a JSON object, got {type(data).__name__}")
    version = data.get("version", 0)
    if version == 0:
      return cls._from_v0(data, step, steps_per_epoch)
    if version > VERSION:
      raise ValueError(f"checkpoint loop state version {version} was written by a newer jaxclf "
                       f"(this one reads versions 0..{VERSION})")
    names = {f.name for f in dataclasses.fields(cls)} - {"resume_pending"}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f"checkpoint loop state version {version}: unknown field(s) {unknown}")
    return cls(**data)

  @classmethod
  def _from_v0(cls, meta: dict[str, Any], step: int, steps_per_epoch: int) -> "LoopState":
    # v0 keys: epoch, iter_state, best, bad_epochs, plateau_bad, plateau_best, history,
    # last_train (added by the first log). `epoch` counted epochs whose end had been handled.
    epoch = int(meta.get("epoch", 0))
    iter_state = meta.get("iter_state")
    return cls(history=list(meta.get("history") or []), best=meta.get("best"),
               bad_checks=int(meta.get("bad_epochs", 0)),
               plateau_best=meta.get("plateau_best"), plateau_bad=int(meta.get("plateau_bad", 0)),
               last_train=meta.get("last_train"), iter_state=iter_state,
               iter_epoch=epoch if iter_state is not None else None,
               resume_pending=epoch * steps_per_epoch < step)

  def iterator_state_for(self, epoch: int) -> Any:
    """The saved iterator position if it belongs to `epoch`, else None (start of the epoch)."""
    return self.iter_state if self.iter_epoch == epoch else None
