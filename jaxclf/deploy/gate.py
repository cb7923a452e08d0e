"""The evaluation gate: may a candidate registry version replace production?

  jaxclf registry gate NAME CANDIDATE --floor 0.85 [--min-delta 0.0] [--promote-to production]

Two checks, both on numbers the registry recorded at registration (the run's evaluation):
  - beats production: candidate val accuracy > production val accuracy + min_delta (the val
    split picks models; the test split is never used to choose between them). With no production
    version yet, the candidate has nothing to beat.
  - regression floor: candidate single-view test accuracy >= floor (the model as served must not
    fall under the documented floor, whatever production does).
A missing figure fails its check: a gate never passes on absent evidence.

Every verdict is written to the registry's audit log (a `gate` note with the checks and numbers),
refusals included; a pass then promotes the candidate (a second, ordinary promote event), unless
promote_to is None. CI runs this command and fails the job on exit 1 (refused).

`dataset_changed` is the retraining trigger: a re-ingest whose manifest version differs from the
dataset version production was trained on.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxclf.registry import Registry, RegistryError

GATE_ACTION = "gate"


@dataclasses.dataclass
class GateResult:
  name: str
  candidate: int
  production: int | None
  passed: bool
  checks: list[dict[str, Any]]
  promoted: dict[str, Any] | None = None

  @property
  def reasons(self) -> list[str]:
    return [c["detail"] for c in self.checks if not c["passed"]]

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "candidate": self.candidate, "production": self.production,
            "passed": self.passed, "checks": self.checks, "reasons": self.reasons,
            "promoted": self.promoted}


def _check(name: str, passed: bool, detail: str, **numbers: Any) -> dict[str, Any]:
  return {"check": name, "passed": bool(passed), "detail": detail, **numbers}


def gate_checks(registry: Registry, name: str, candidate: int, *, floor: float,
                min_delta: float = 0.0) -> tuple[int | None, list[dict[str, Any]]]:
  """(production version or None, the list of checks) for `candidate`; writes nothing."""
  cand = registry.get(name, candidate).accuracy
  try:
    prod_version: int | None = registry.resolve(name, "production")
  except RegistryError:
    prod_version = None
  checks = []
  cv = cand.get("val")
  if prod_version is None:
    checks.append(_check("beats_production", cv is not None,
                         "no production version yet" if cv is not None
                         else f"v{candidate} has no val accuracy recorded", candidate_val=cv))
  elif prod_version == candidate:
    checks.append(_check("beats_production", False, f"v{candidate} already is production"))
  else:
    pv = registry.get(name, prod_version).accuracy.get("val")
    ok = cv is not None and pv is not None and cv > pv + min_delta
    detail = (f"val accuracy v{candidate} {cv} vs production v{prod_version} {pv}"
              f" (needs > production + {min_delta})")
    checks.append(_check("beats_production", ok, detail, candidate_val=cv, production_val=pv,
                         min_delta=min_delta))
  ct = cand.get("test")
  checks.append(_check("accuracy_floor", ct is not None and ct >= floor,
                       f"single-view test accuracy v{candidate} {ct} (floor {floor})",
                       candidate_test=ct, floor=floor))
  return prod_version, checks


def run_gate(registry: Registry, name: str, candidate: str | int, *, floor: float,
             min_delta: float = 0.0, promote_to: str | None = "production",
             reason: str = "") -> GateResult:
  """Decides, audits the decision, and promotes on a pass."""
  version = registry.resolve(name, candidate)
  prod, checks = gate_checks(registry, name, version, floor=floor, min_delta=min_delta)
  result = GateResult(name, version, prod, all(c["passed"] for c in checks), checks)
  registry.note(name, version, GATE_ACTION, result="passed" if result.passed else "refused",
                production=prod, checks=checks, reason=reason)
  if result.passed and promote_to:
    why = f"passed the evaluation gate against v{prod}" if prod else "passed the evaluation gate"
    result.promoted = registry.promote(name, version, promote_to,
                                       reason=f"{why}{': ' + reason if reason else ''}")
  return result


def dataset_changed(registry: Registry, name: str, manifest_path: str,
                    stage: str = "production") -> dict[str, Any]:
  """Compares a manifest's dataset version with the one `stage` was trained on."""
  with open(manifest_path) as f:
    current = json.load(f).get("version")
  if not current:
    raise RegistryError(f"{manifest_path}: no 'version' field (is this an ingest manifest.json?)")
  try:
    trained = registry.get(name, stage).metadata.get("dataset_version")
  except RegistryError:
    trained = None
  return {"manifest_version": current, f"{stage}_dataset_version": trained,
          "changed": trained != current}
