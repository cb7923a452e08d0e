"""The sweep's summary: every trial with its state and val metric, the best trial by validation,
its config and the command that reproduces it. Test metrics appear for that one trial only,
labelled: they are read from its run.json here, after the search, and never enter the study.
"""
from __future__ import annotations

import json
import os
import shlex
from typing import Any

from optuna.trial import TrialState

from jaxclf.sweeps.study import original_number, retried_numbers, trial_dir


def _row(t, workdir: str, metric: str) -> dict[str, Any]:
  run_dir = trial_dir(workdir, t)
  record = {}
  if os.path.exists(os.path.join(run_dir, "run.json")):
    with open(os.path.join(run_dir, "run.json")) as f:
      record = json.load(f)
  last = t.user_attrs.get("last_epoch") or {}
  return {"trial": original_number(t), "optuna_number": t.number, "state": t.state.name,
          "params": t.params, metric: t.value if t.state == TrialState.COMPLETE else last.get(metric),
          "epochs": last.get("epoch"), "duration_s": record.get("duration_s"),
          "reason": t.user_attrs.get("fail_reason"), "run_dir": os.path.relpath(run_dir, workdir),
          "worker": t.user_attrs.get("worker")}


def reproduce_command(plan: dict[str, Any], params: dict[str, Any], name: str) -> str:
  sets = {**plan["sweep"]["set"], **params}
  items = list(plan.get("overrides") or []) + [f"{k}={_yaml(v)}" for k, v in sets.items()]
  return " ".join(["jaxclf", "train", "--config", shlex.quote(plan["config"]), "--workdir",
                   shlex.quote(f"runs/{name}")] +
                  [f"--set {shlex.quote(i)}" for i in items])


def _yaml(v: Any) -> str:
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_yaml(x) for x in v) + "]"
  return json.dumps(v) if isinstance(v, str) and not v.isidentifier() else str(v)


def summarize(study, plan: dict[str, Any], workdir: str) -> dict[str, Any]:
  metric = plan["sweep"]["metric"]
  replaced = retried_numbers(study)
  trials = [t for t in study.get_trials(deepcopy=False) if t.number not in replaced]
  rows = sorted((_row(t, workdir, metric) for t in trials), key=lambda r: r["trial"])
  counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL",
                                                             "RUNNING", "WAITING")}
  out: dict[str, Any] = {"study": plan["study_name"], "config": plan["config"],
                         "sweep": plan["sweep_name"], "sampler": plan["sweep"]["sampler"],
                         "pruner": plan["sweep"]["pruner"], "metric": metric,
                         "budget": plan["sweep"]["trials"], "counts": counts, "trials": rows,
                         "compute_s": round(sum(r["duration_s"] or 0 for r in rows), 1),
                         "best": None}
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  if complete:
    best = study.best_trial  # by the val metric and the study's direction, nothing else
    run_dir = trial_dir(workdir, best)
    with open(os.path.join(run_dir, "run.json")) as f:
      record = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
      config = json.load(f)
    name = f"{plan['study_name']}-best"
    out["best"] = {"trial": original_number(best), metric: best.value, "params": best.params,
                   "run_dir": os.path.relpath(run_dir, workdir), "config": config,
                   "reproduce": reproduce_command(plan, best.params, name),
                   "test_of_best_trial_only": {
                       "note": "held-out test split of the selected trial only; never used for "
                               "selection (the sampler and pruner saw validation only)",
                       **((record.get("metrics") or {}).get("test") or {})}}
  return out


def write_summary(study, plan: dict[str, Any], workdir: str) -> dict[str, Any]:
  s = summarize(study, plan, workdir)
  for name, text in (("summary.json", json.dumps(s, indent=2, default=list)),
                     ("summary.md", format_summary(s) + "\n")):
    tmp = os.path.join(workdir, f".{name}.{os.getpid()}")  # workers may finish together
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, name))
  return s


def format_summary(s: dict[str, Any]) -> str:
  m = s["metric"]
  keys = sorted({k for r in s["trials"] for k in r["params"]})
  head = ["trial", "state", m, "epochs", "time_s"] + [k.rsplit(".", 1)[-1] for k in keys] + ["reason"]
  body = [[r["trial"], r["state"], "-" if r[m] is None else f"{r[m]:.4f}", r["epochs"] or "-",
           "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}"] +
          [_fmt(r["params"].get(k)) for k in keys] + [(r["reason"] or "")[:60]]
          for r in s["trials"]]
  widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
  lines = [f"sweep {s['sweep']} ({s['sampler']} sampler, {s['pruner']} pruner, budget "
           f"{s['budget']}): " + ", ".join(f"{v} {k.lower()}" for k, v in s["counts"].items() if v)
           + f"; trial compute {s['compute_s']:.0f} s", ""]
  lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head] + body]
  b = s["best"]
  if b:
    test = b["test_of_best_trial_only"]
    lines += ["", f"best trial {b['trial']} by {m}: {b[m]:.4f}  params {b['params']}",
              f"  reproduce: {b['reproduce']}",
              f"  test accuracy of this trial only (not used for selection): "
              f"{test.get('accuracy', float('nan')):.4f} on {test.get('count', '?')} images"]
  else:
    lines += ["", "no completed trial yet"]
  return "\n".join(lines)


def _fmt(v: Any) -> str:
  return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
