"""The model registry: immutable, numbered versions of export directories, with stages.

Layout under the root (a local directory, or any fsspec URL such as s3://bucket/registry):

  <name>/claims/<N>                  version number N taken (exclusive create: see store.py)
  <name>/versions/<N>/               the export's files, copied once, never changed
  <name>/versions/<N>/version.json   metadata, written last: a version without it is incomplete
                                     and invisible (a register that died half way)
  <name>/events/<SEQ>.json           the audit log, one exclusively-created file per event:
                                     register / promote / rollback with time, user, reason

Concurrent writers: two `register`s never get the same N, and two events never get the same SEQ,
because each number is taken by an exclusive create and the loser moves on to the next number.
Stages are not stored in the (immutable) versions; they are the replay of the event log, so a
stage change is one atomic append. `production` and `staging` hold at most one version: promoting
another moves the previous holder to `archived`; `rollback` gives production back to the version
that held it before the current one.

Every load (`open_version`) re-hashes the files against version.json, and version.json against
the hash recorded in the register event, and refuses a version that does not match.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import os
import re
import socket
from typing import Any, Iterator

from jaxclf.artifacts import ArtifactError, verify_export_dir
from jaxclf.registry.store import Store, gave_up, unreachable
from jaxclf.hashing import sha256_bytes as _sha256_bytes, sha256_file as _sha256_file
from jaxclf.tracking.run_record import accuracy_summary

STAGES = ("experimental", "staging", "production", "archived")
SINGLE_HOLDER_STAGES = ("staging", "production")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_FILE = "version.json"
MAX_CLAIM_TRIES = 10_000


class RegistryError(RuntimeError):
  """A request the registry cannot honour (unknown model/version/stage, bad export...)."""


class IntegrityError(RegistryError):
  """A registered file does not match its recorded sha256: the version refuses to load."""


def default_root() -> str:
  return os.environ.get("JAXCLF_REGISTRY") or "registry_store"


def _now() -> str:
  return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _user() -> str:
  try:
    return f"{getpass.getuser()}@{socket.gethostname()}"
  except (KeyError, OSError):
    return f"uid{os.getuid()}@{socket.gethostname()}"






@dataclasses.dataclass
class ModelVersion:
  name: str
  version: int
  stage: str
  metadata: dict[str, Any]

  @property
  def accuracy(self) -> dict[str, Any]:
    """`accuracy_summary` of the version: `test` is the single-view test accuracy (the model as
    served), `test_tta` a separate flip-TTA figure. Versions registered before version.json had
    an "accuracy" block get it computed from their metrics and config the same way."""
    m = self.metadata
    acc = m.get("accuracy")
    return acc if isinstance(acc, dict) else accuracy_summary(m.get("metrics"), m.get("config"))

  def summary(self) -> dict[str, Any]:
    m = self.metadata
    acc = self.accuracy
    return {"name": self.name, "version": self.version, "stage": self.stage,
            "created": m.get("created"), "source_run": m.get("source", {}).get("run_dir"),
            "checkpoint_step": m.get("source", {}).get("checkpoint_step"),
            "dataset_version": m.get("dataset_version"),
            "test_accuracy": acc.get("test"),
            "test_tta_accuracy": acc.get("test_tta"),
            "val_accuracy": acc.get("val"),
            "temperature": _dig(m, "calibration", "temperature"),
            "model_sha256": m.get("artifacts", {}).get("model.onnx", {}).get("sha256")}


def _dig(d: Any, *keys: str) -> Any:
  for k in keys:
    if not isinstance(d, dict):
      return None
    d = d.get(k)
  return d


class Registry:
  def __init__(self, root: str | None = None, cache_dir: str | None = None):
    self.store = Store(root or default_root())
    self.cache_dir = cache_dir or os.path.join(
        os.environ.get("JAXCLF_CACHE") or os.path.expanduser("~/.cache/jaxclf"), "registry",
        hashlib.sha1(self.store.url.encode()).hexdigest()[:12])

  @property
  def root(self) -> str:
    return self.store.url

  # ------------------------------------------------------------------ names and numbers

  def _check_name(self, name: str) -> None:
    if not NAME_RE.match(name or ""):
      raise RegistryError(f"model name {name!r}: use 1-64 letters, digits, '_' or '-', starting "
                          "with a letter or digit")

  def names(self) -> list[str]:
    return [n for n in self.store.listdir(self.store.root)
            if NAME_RE.match(n) and self.store.isdir(self.store.path(n, "versions"))]

  def _require_name(self, name: str) -> None:
    self._check_name(name)
    if name not in self.names():
      known = ", ".join(self.names()) or "none yet"
      raise RegistryError(f"no model named {name!r} in registry {self.root} (models: {known})")

  def _numbers(self, name: str, sub: str) -> list[int]:
    return sorted(int(e.split(".")[0]) for e in self.store.listdir(self.store.path(name, sub))
                  if e.split(".")[0].isdigit())

  def _take_number(self, name: str, sub: str, payload: bytes, suffix: str = "") -> int:
    """The next free number under `sub`, taken by exclusive create (losers retry with n+1)."""
    n = (max(self._numbers(name, sub)) if self._numbers(name, sub) else 0) + 1
    for _ in range(MAX_CLAIM_TRIES):
      if self.store.create_exclusive(self.store.path(name, sub, f"{n:08d}{suffix}" if suffix
                                                      else str(n)), payload):
        return n
      n += 1
    raise RegistryError(f"could not take a number under {name}/{sub} after {MAX_CLAIM_TRIES} tries")

  # ------------------------------------------------------------------ events (audit log)

  def _append_event(self, name: str, event: dict[str, Any]) -> dict[str, Any]:
    event = {"time": _now(), "user": _user(), **event}
    seq = self._take_number(name, "events", json.dumps(event, sort_keys=True).encode(), ".json")
    event["seq"] = seq
    return event

  def note(self, name: str, ref: str | int, action: str, **details: Any) -> dict[str, Any]:
    """Appends an audited event about a version that changes no stage (who decided what, and
    why: e.g. an evaluation gate's verdict). The registry stores it; it does not interpret it."""
    self._require_name(name)
    if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", action) or action in ("register", "promote",
                                                                        "rollback"):
      raise RegistryError(f"note action {action!r}: use a lowercase word other than register, "
                          "promote or rollback")
    version = self.resolve(name, ref)
    return self._append_event(name, {**details, "action": action, "version": version,
                                     "to_stage": None})

  def events(self, name: str) -> list[dict[str, Any]]:
    out = []
    for entry in self.store.listdir(self.store.path(name, "events")):
      if not entry.endswith(".json") or not entry[:-5].isdigit():
        continue
      ev = json.loads(self.store.read_bytes(self.store.path(name, "events", entry)))
      ev["seq"] = int(entry[:-5])
      out.append(ev)
    return sorted(out, key=lambda e: e["seq"])

  def _replay(self, name: str, events: list[dict[str, Any]] | None = None
              ) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Event log -> (version -> stage, history of stage changes incl. implied demotions)."""
    stages: dict[int, str] = {}
    history: list[dict[str, Any]] = []
    for ev in events if events is not None else self.events(name):
      if ev.get("to_stage") is None:
        continue  # a note (e.g. a gate decision): audited, changes no stage
      v, to = int(ev["version"]), ev["to_stage"]
      changes = [(v, stages.get(v), to)]
      if to in SINGLE_HOLDER_STAGES:
        changes += [(other, to, "archived") for other, s in stages.items() if s == to and other != v]
      for ver, frm, dst in changes:
        stages[ver] = dst
        history.append({"seq": ev["seq"], "time": ev["time"], "user": ev.get("user"),
                        "action": ev["action"] if ver == v else "replaced",
                        "version": ver, "from_stage": frm, "to_stage": dst,
                        "reason": ev.get("reason") if ver == v else f"v{v} became {to}"})
    return stages, history

  # ------------------------------------------------------------------ register

  def register(self, export_dir: str, name: str, *, description: str = "",
               stage: str = "experimental", reason: str = "",
               metrics: dict[str, Any] | None = None) -> ModelVersion:
    """Copies a verified export directory into the registry as the next version of `name`."""
    self._check_name(name)
    self._check_stage(stage)
    try:
      export = verify_export_dir(export_dir)
    except ArtifactError as e:
      raise RegistryError(f"refusing to register {export_dir}: {e}") from None
    files = sorted(f for f in os.listdir(export_dir)
                   if not f.startswith(".") and os.path.isfile(os.path.join(export_dir, f))
                   and f != VERSION_FILE)
    artifacts = {f: {"sha256": _sha256_file(os.path.join(export_dir, f)),
                     "size": os.path.getsize(os.path.join(export_dir, f))} for f in files}
    source = dict(export.get("source", {}))
    run_metrics = (metrics if metrics is not None else source.get("metrics", {})) or {}
    metrics_record = {"val": run_metrics.get("val"), "test": run_metrics.get("test")}
    if run_metrics.get("test_tta") is not None:  # flip-TTA test figure, kept apart and labelled
      metrics_record["test_tta"] = run_metrics["test_tta"]
    claim = json.dumps({"time": _now(), "user": _user(), "export_dir": os.path.abspath(export_dir)})
    try:
      return self._upload(export_dir, name, files, artifacts, export, source, metrics_record,
                          claim, description=description, stage=stage, reason=reason)
    except Exception as e:
      if not unreachable(e):
        raise
      raise RegistryError(
          f"{self.root.rstrip('/')}/{name}: the registry store did not answer while registering "
          f"({type(e).__name__}: {e}; {gave_up(self.root)}); no version was "
          "listed (an index entry is written only after every artefact). Register again when "
          "it is back") from None

  def _upload(self, export_dir, name, files, artifacts, export, source, metrics_record, claim, *,
              description, stage, reason) -> ModelVersion:
    """Artefacts first, then version.json, then the register event: a version is listed only
    when it has all three (version_numbers), so a store lost half way lists nothing new."""
    version = self._take_number(name, "claims", claim.encode())
    meta = {
        "name": name, "version": version, "created": _now(), "created_by": _user(),
        "description": description,
        "source": {k: source.get(k) for k in ("run_dir", "run_name", "checkpoint",
                                               "checkpoint_step", "weights", "git",
                                               "mlflow_run_id")
                   if k in source},
        "config": source.get("config"),
        "dataset_version": source.get("dataset_version") or _dig(source, "dataset", "version"),
        "metrics": metrics_record,
        # What `show` / `list` present as the model's accuracy: single-view test accuracy, with
        # any TTA figure apart and labelled (see tracking.run_record.accuracy_summary).
        "accuracy": accuracy_summary(metrics_record, source.get("config")),
        "calibration": export.get("calibration"),
        "model": export.get("model"),
        "parity": export.get("parity"),
        "export_dir": os.path.abspath(export_dir),
        "artifacts": artifacts,
    }
    dest = self.store.path(name, "versions", version)
    for f in files:
      self.store.put_file(os.path.join(export_dir, f), f"{dest}/{f}")
    # Re-hash what landed: a file that changed between hashing and copying must not register.
    if self.store.local:
      for f, a in artifacts.items():
        if _sha256_file(f"{dest}/{f}") != a["sha256"]:
          raise RegistryError(f"{export_dir}/{f} changed while it was being registered")
    meta_bytes = json.dumps(meta, indent=2, default=str).encode()
    self.store.write_atomic(f"{dest}/{VERSION_FILE}", meta_bytes)
    self.store.make_read_only([f"{dest}/{f}" for f in [*files, VERSION_FILE]])
    self._append_event(name, {"action": "register", "version": version, "to_stage": stage,
                              "reason": reason or f"registered from {os.path.abspath(export_dir)}",
                              "metadata_sha256": _sha256_bytes(meta_bytes)})
    return ModelVersion(name, version, stage, meta)

  # ------------------------------------------------------------------ read

  def _metadata(self, name: str, version: int) -> dict[str, Any]:
    path = self.store.path(name, "versions", version, VERSION_FILE)
    if not self.store.exists(path):
      have = ", ".join(map(str, self.version_numbers(name))) or "none"
      raise RegistryError(f"model {name!r} has no version {version} (versions: {have})")
    return json.loads(self.store.read_bytes(path))

  def version_numbers(self, name: str) -> list[int]:
    """Complete versions: version.json present (written after every artefact) and a register
    event (written after version.json) in the audit log."""
    registered = {int(e["version"]) for e in self.events(name) if e.get("action") == "register"}
    return [v for v in self._numbers(name, "versions")
            if v in registered and self.store.exists(self.store.path(name, "versions", v,
                                                                      VERSION_FILE))]

  def list_versions(self, name: str) -> list[ModelVersion]:
    self._require_name(name)
    stages, _ = self._replay(name)
    return [ModelVersion(name, v, stages.get(v, "experimental"), self._metadata(name, v))
            for v in self.version_numbers(name)]

  def resolve(self, name: str, ref: str | int) -> int:
    """'3' | 3 | 'production' | 'staging' | 'latest' -> a version number."""
    self._require_name(name)
    ref = str(ref).strip()
    if ref.lstrip("v").isdigit():
      v = int(ref.lstrip("v"))
      self._metadata(name, v)  # raises if absent
      return v
    if ref == "latest":
      nums = self.version_numbers(name)
      if not nums:
        raise RegistryError(f"model {name!r} has no complete version")
      return nums[-1]
    self._check_stage(ref)
    stages, _ = self._replay(name)
    holders = sorted(v for v, s in stages.items() if s == ref)
    if not holders:
      raise RegistryError(f"model {name!r} has no version in stage {ref!r}")
    return holders[-1]

  def get(self, name: str, ref: str | int) -> ModelVersion:
    v = self.resolve(name, ref)
    stages, _ = self._replay(name)
    return ModelVersion(name, v, stages.get(v, "experimental"), self._metadata(name, v))

  def history(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
    self._require_name(name)
    _, hist = self._replay(name)
    return [h for h in hist if version is None or h["version"] == version]

  def show(self, name: str, ref: str | int) -> dict[str, Any]:
    mv = self.get(name, ref)
    return {**mv.metadata, "accuracy": mv.accuracy, "stage": mv.stage,
            "history": self.history(name, mv.version)}

  # ------------------------------------------------------------------ stages

  def _check_stage(self, stage: str) -> None:
    if stage not in STAGES:
      raise RegistryError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

  def promote(self, name: str, ref: str | int, stage: str, reason: str = "") -> dict[str, Any]:
    """Moves a version to `stage` (audited). Returns {"version", "stage", "previous": holder or None}."""
    self._check_stage(stage)
    self._require_name(name)
    version = int(str(ref).lstrip("v")) if str(ref).lstrip("v").isdigit() else self.resolve(name, ref)
    self._metadata(name, version)  # a missing version fails here, before any event is written
    stages, _ = self._replay(name)
    previous = next((v for v, s in stages.items() if s == stage and v != version), None)
    if stages.get(version) == stage:
      return {"version": version, "stage": stage, "previous": None, "changed": False}
    ev = self._append_event(name, {"action": "promote", "version": version, "to_stage": stage,
                                   "from_stage": stages.get(version), "reason": reason,
                                   "replaces": previous if stage in SINGLE_HOLDER_STAGES else None})
    return {"version": version, "stage": stage, "previous": previous, "changed": True,
            "seq": ev["seq"]}

  def rollback(self, name: str, stage: str = "production", reason: str = "") -> dict[str, Any]:
    """Gives `stage` back to the version that held it before the current holder."""
    if stage not in SINGLE_HOLDER_STAGES:
      raise RegistryError(f"rollback applies to {' and '.join(SINGLE_HOLDER_STAGES)}, not {stage!r}")
    self._require_name(name)
    events = self.events(name)
    stages, hist = self._replay(name, events)
    current = next((v for v, s in stages.items() if s == stage), None)
    if current is None:
      raise RegistryError(f"model {name!r} has no {stage} version to roll back from")
    holders = [h["version"] for h in hist if h["to_stage"] == stage]
    earlier = [v for v in reversed(holders) if v != current and v in self.version_numbers(name)]
    if not earlier:
      raise RegistryError(f"model {name!r}: v{current} is the only version that was ever {stage}; "
                          "nothing to roll back to")
    target = earlier[0]
    ev = self._append_event(name, {"action": "rollback", "version": target, "to_stage": stage,
                                   "from_stage": stages.get(target), "replaces": current,
                                   "reason": reason or f"rollback from v{current}"})
    return {"version": target, "stage": stage, "previous": current, "changed": True,
            "seq": ev["seq"]}

  # ------------------------------------------------------------------ load (verified)

  def verify(self, name: str, ref: str | int, local_dir: str | None = None) -> dict[str, Any]:
    """Checks version.json against the register event and every file against version.json."""
    version = self.resolve(name, ref)
    meta_path = self.store.path(name, "versions", version, VERSION_FILE)
    meta_bytes = (open(os.path.join(local_dir, VERSION_FILE), "rb").read() if local_dir
                  else self.store.read_bytes(meta_path))
    reg = next((e for e in self.events(name)
                if e["action"] == "register" and int(e["version"]) == version), None)
    label = f"{name} v{version}"
    if reg is None:
      raise IntegrityError(f"{label}: no register event in the audit log; refusing to load")
    if reg.get("metadata_sha256") != _sha256_bytes(meta_bytes):
      raise IntegrityError(f"{label}: {VERSION_FILE} does not match the sha256 recorded when it "
                           "was registered; refusing to load")
    meta = json.loads(meta_bytes)
    base = local_dir or self.store.path(name, "versions", version)
    for f, a in meta["artifacts"].items():
      path = os.path.join(base, f)
      if not os.path.isfile(path):
        raise IntegrityError(f"{label}: {f} is missing from {base}; refusing to load")
      got = _sha256_file(path)
      if got != a["sha256"]:
        raise IntegrityError(f"{label}: {f} has sha256 {got[:16]}… but was registered as "
                             f"{a['sha256'][:16]}… — the artefact was modified after "
                             "registration; refusing to load")
    return meta

  def open_version(self, name: str, ref: str | int) -> str:
    """A local directory holding the version's files, verified now. Local registries return the
    version directory itself; remote ones download into the cache first."""
    version = self.resolve(name, ref)
    if self.store.local:
      self.verify(name, version)
      return self.store.path(name, "versions", version)
    dest = os.path.join(self.cache_dir, name, str(version))
    os.makedirs(dest, exist_ok=True)
    src = self.store.path(name, "versions", version)
    self.store.get_file(f"{src}/{VERSION_FILE}", os.path.join(dest, VERSION_FILE))
    meta = json.loads(open(os.path.join(dest, VERSION_FILE), "rb").read())
    for f, a in meta["artifacts"].items():
      local = os.path.join(dest, f)
      if not (os.path.isfile(local) and _sha256_file(local) == a["sha256"]):
        self.store.get_file(f"{src}/{f}", local)
    self.verify(name, version, local_dir=dest)
    return dest


def iter_models(registry: Registry) -> Iterator[ModelVersion]:
  for name in registry.names():
    yield from registry.list_versions(name)
