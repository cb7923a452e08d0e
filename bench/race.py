"""Race: the PyTorch anchor against jaxclf's default config, same machine, back to back. JSON out.

  .venv/bin/python bench/race.py --quick                       # 1 epoch per side: a few minutes
  .venv/bin/python bench/race.py                               # seed 0, full recipes (~30 min)
  .venv/bin/python bench/race.py --seeds 0,1,2 --out bench/results/race.json
  .venv/bin/python bench/race.py --only jax --jax-set train.num_epochs=8 --jax-set train.batch_size=256
  .venv/bin/python bench/race.py --jax-config configs/cnn.py:quick --torch-epochs 2

What it measures, per seed, PyTorch first and then jaxclf (back to back, so background load hits
both alike), each in its own fresh process:
  * PyTorch: bench/torch_anchor.py, the anchor of shared/design/FINDINGS.md ("Anchors the
    project must beat": VGG-style CNN 32-32-M-64-64-M-128-M, SGD-Nesterov one-cycle, batch 256,
    translate + flip, 10 epochs), on jaxclf's own Fashion-MNIST split (the same 54k train / 6k
    val, carved by jaxclf.data.splits.carve_validation). split_check compares a hash of the rows
    each side actually used (bench/row_hash.py): the anchor's train/val/test arrays, and the
    Dataset jaxclf's training loop was handed (bench/jax_rows.py runs jaxclf.main with that hook).
  * jaxclf: bench/jax_rows.py, i.e. `python -m jaxclf.main --config=configs/cnn.py
    --workdir=<fresh tmp>/jax_s{S} --config.seed=S` and the row hashes (plus
    --config.train.num_epochs=1 under --quick, and any --jax-set overrides), then its run.json:
    metrics.test (on the best-by-val checkpoint, as jaxclf reports it; with flip TTA when the
    config's train.tta_flip is on), metrics.val, history, and calibration (test_ece: the test
    ECE after temperature scaling, i.e. the served model's; the PyTorch side has none).
  * wall_s: from just before the child is started to the final test accuracy (PyTorch: the
    timestamp the child prints right after its test accuracy; jaxclf: the process exit, so it
    includes jax import, compilation, checkpointing and the test evaluation); on both sides less
    the seconds the split_check row hashing took (each side reports them).
  * time_to_target_s: wall time at which per-epoch val accuracy first reaches --target (0.93);
    null if never reached (or, for jaxclf, if run.json's history has no per-epoch wall_time).
  * curve: per epoch (epoch, val_acc, elapsed_s); images_per_s = train images seen / wall_s
    (end to end), plus each side's own steady-state train throughput.
  * summary: mean +- std over seeds per side, and jaxclf / PyTorch ratios (wall time, time to
    target) and the test-accuracy difference in points (jaxclf minus PyTorch).
  * env: git commit + dirty flag, torch/jax versions, CPU, load average at start and end; and the
    code and config of each side (torch recipe dict, script sha256; jaxclf config.json path and
    contents).

A full race takes about 30 min per seed on the 2-core CPU machine (PyTorch 10 epochs ~9-10 min,
jaxclf's default ~10 min, plus start-up and evaluation), so develop with --quick. It uses every
core: run nothing else heavy meanwhile. torch is a bench-only dependency (requirements/bench.txt);
jaxclf never imports it and bench/torch_anchor.py never imports jax.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import scrub_paths  # noqa: E402

DEFAULT_JAX_CONFIG = "configs/cnn.py"


def log(msg: str) -> None:
  print(f"[race] {msg}", file=sys.stderr, flush=True)


def _version(pkg: str) -> str | None:
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def _git() -> dict:
  def run(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=10).stdout
  try:
    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD").strip() or None, "dirty": bool(status.strip()),
            "dirty_files": [ln[3:] for ln in status.splitlines()][:200]}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def _cpu() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def _sha(path: str) -> str | None:
  try:
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    return None


def _tail(path: str, n: int = 25) -> list[str]:
  try:
    with open(path, errors="replace") as f:
      return f.read().splitlines()[-n:]
  except OSError:
    return []


class LoadSampler:
  """Samples the 1-min load average every `every` s while a child runs (others share the CPU)."""

  def __init__(self, every: float = 10.0):
    import threading
    self.samples: list[float] = [os.getloadavg()[0]]
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, args=(every,), daemon=True)

  def _run(self, every):
    while not self._stop.wait(every):
      self.samples.append(os.getloadavg()[0])

  def __enter__(self):
    self._t.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()
    self.samples.append(os.getloadavg()[0])

  def summary(self) -> dict:
    return {"mean": round(statistics.mean(self.samples), 2), "max": round(max(self.samples), 2),
            "samples": len(self.samples)}


def _time_to_target(curve: list[dict], target: float) -> float | None:
  for row in curve:
    if row["val_acc"] is not None and row["val_acc"] >= target:
      return row["elapsed_s"]  # None when that epoch has no timestamp
  return None


def _r(x, nd=4):
  return None if x is None else round(float(x), nd)


# --------------------------------------------------------------------------------------- torch
def run_torch(seed: int, epochs: int, target: float, workroot: str) -> dict:
  logf = os.path.join(workroot, f"torch_s{seed}.log")
  cmd = [sys.executable, os.path.join(HERE, "torch_anchor.py"), "--seed", str(seed),
         "--epochs", str(epochs)]
  log(f"torch seed {seed}: {' '.join(cmd[1:])}  (stderr -> {logf})")
  load = os.getloadavg()
  events: list[dict] = []
  with open(logf, "w") as err, LoadSampler() as ls:
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    for line in proc.stdout:
      try:
        ev = json.loads(line)
      except json.JSONDecodeError:
        continue
      events.append(ev)
      if ev.get("event") == "epoch":
        log(f"  torch epoch {ev['epoch']}: val {ev['val_accuracy']:.4f} "
            f"at {ev['t'] - t0:.0f}s")
    rc = proc.wait()
    t_exit = time.time()
  out = {"side": "pytorch", "seed": seed, "cmd": cmd, "returncode": rc, "log": logf,
         "load_avg_before": load, "load_avg_during": ls.summary(),
         "exit_s": round(t_exit - t0, 2)}
  result = next((e for e in events if e.get("event") == "result"), None)
  test_ev = next((e for e in events if e.get("event") == "test"), None)
  if rc != 0 or result is None:
    out["error"] = f"exit {rc}"
    out["log_tail"] = _tail(logf)
    return out
  # The row hashing (for split_check) ran before training: its seconds are not the recipe's.
  t0 += float((result.get("data") or {}).get("rows_hash_s") or 0.0)
  curve = [{"epoch": e["epoch"], "val_acc": _r(e["val_accuracy"]),
            "elapsed_s": round(e["t"] - t0, 2)} for e in events if e.get("event") == "epoch"]
  wall = (test_ev["t"] - t0) if test_ev else (t_exit - t0)
  vals = [c["val_acc"] for c in curve]
  images = result["steps"] * result["recipe"]["batch_size"]
  out.update({
      "test_accuracy": _r(result["test"]["accuracy"]),
      "best_val_accuracy": max(vals) if vals else None,
      "final_val_accuracy": vals[-1] if vals else None,
      "wall_s": round(wall, 2), "wall_end": "timestamp printed after the test accuracy"
      if test_ev else "process exit",
      "time_to_target_s": _time_to_target(curve, target),
      "curve": curve,
      "epochs": result["epochs"], "steps": result["steps"], "train_images": images,
      "images_per_s": round(images / wall, 1),
      "train_images_per_s": _r(result.get("train_images_per_s"), 1),
      "params": result["params"], "threads": result["threads"], "torch": result["torch"],
      "data": result["data"], "jax_imported": result["jax_imported"],
      "code": {p: _sha(os.path.join(HERE, p)) for p in ("torch_anchor.py", "torch_models.py")},
      "recipe": result["recipe"],
  })
  return out


# ----------------------------------------------------------------------------------------- jax
def run_jax(seed: int, config: str, overrides: list[str], quick: bool, target: float,
            workroot: str) -> dict:
  workdir = os.path.join(workroot, f"jax_s{seed}")
  if os.path.exists(workdir):
    raise RuntimeError(f"{workdir} exists: refusing to resume a previous run")
  logf = os.path.join(workroot, f"jax_s{seed}.log")
  rows_json = os.path.join(workroot, f"jax_s{seed}.rows.json")
  # jaxclf.main as `python -m jaxclf.main` runs it, plus a hash of the rows its training loop was
  # handed (bench/jax_rows.py); the hashing's seconds come off wall_s below.
  cmd = [sys.executable, os.path.join(HERE, "jax_rows.py"), rows_json, f"--config={config}",
         f"--workdir={workdir}", f"--config.seed={seed}"]
  if quick:
    cmd.append("--config.train.num_epochs=1")
  cmd += [f"--config.{kv}" for kv in overrides]
  # JAXCLF_<SECTION>__<KEY> variables would silently change the config: drop them.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXCLF_") or k == "JAXCLF_CACHE"}
  dropped = sorted(k for k in os.environ if k.startswith("JAXCLF_") and k not in env)
  log(f"jaxclf seed {seed}: {' '.join(cmd[1:])}  (output -> {logf})")
  load = os.getloadavg()
  with open(logf, "w") as f, LoadSampler() as ls:
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    t_exit = time.time()
  out = {"side": "jaxclf", "seed": seed, "cmd": cmd, "returncode": rc, "log": logf,
         "workdir": workdir, "load_avg_before": load, "load_avg_during": ls.summary(),
         "dropped_env": dropped,
         "exit_s": round(t_exit - t0, 2)}
  run_json = os.path.join(workdir, "run.json")
  cfg_path = os.path.join(workdir, "config.json")
  try:
    with open(run_json) as f:
      run = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    run = None
    out["error"] = f"exit {rc}; no run.json ({type(e).__name__})"
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError):
    cfg = None
  out["config_json"] = {"path": cfg_path, "contents": cfg}
  try:
    with open(rows_json) as f:
      out["data_rows"] = json.load(f)
    t_exit -= out["data_rows"]["hash_s"]
  except (OSError, json.JSONDecodeError, KeyError):
    out["data_rows"] = None
  test = ((run or {}).get("metrics") or {}).get("test")
  if rc != 0 or run is None or not test:
    out.setdefault("error", f"exit {rc}; status {(run or {}).get('status')}; "
                            f"error {(run or {}).get('error')}")
    out["log_tail"] = _tail(logf)
    return out
  history = run.get("history") or []
  has_time = bool(history) and all(h.get("wall_time") is not None for h in history)
  curve = [{"epoch": h.get("epoch"), "val_acc": _r(h.get("val_accuracy")),
            "elapsed_s": round(h["wall_time"] - t0, 2) if h.get("wall_time") is not None
            else None} for h in history]
  vals = [c["val_acc"] for c in curve if c["val_acc"] is not None]
  batch = int(((cfg or {}).get("train") or {}).get("batch_size") or 0)
  steps = run.get("final_step")
  images = steps * batch if steps and batch else None
  wall = t_exit - t0
  val_best = (run.get("metrics") or {}).get("val")
  out.update({
      "test_accuracy": _r(test.get("accuracy")),
      "test_accuracy_tta": _r(((run.get("metrics") or {}).get("test_tta") or {}).get("accuracy")),
      "test_on": "metrics.test.accuracy of run.json (jaxclf tests its best-by-val checkpoint)",
      "config_tta_flip": bool(((cfg or {}).get("train") or {}).get("tta_flip")),
      "metrics_test": test, "metrics_val": val_best,
      # the served model's test ECE: the export bakes the fitted temperature in
      "test_ece": _r((run.get("calibration") or {}).get("test_ece_after")),
      "calibration": run.get("calibration"),
      "metrics_other": {k: v for k, v in (run.get("metrics") or {}).items()
                        if k not in ("test", "val")},
      "best_val_accuracy": max(vals) if vals else _r((val_best or {}).get("accuracy")),
      "final_val_accuracy": vals[-1] if vals else None,
      "wall_s": round(wall, 2), "wall_end": "process exit",
      "time_to_target_s": _time_to_target(curve, target),
      "time_to_target_note": None if has_time else
      "run.json history has no per-epoch wall_time: elapsed_s and time_to_target_s are null",
      "curve": curve,
      "epochs": len(history), "steps": steps, "train_images": images,
      "images_per_s": round(images / wall, 1) if images else None,
      "train_images_per_s": _r(((run.get("last_train") or {}).get("images_per_sec")), 1),
      "run_status": run.get("status"), "run_duration_s": run.get("duration_s"),
      "params": (run.get("model") or {}).get("params"),
      "dataset": run.get("dataset"),
      "jax": _version("jax"),
      "code": {"git": run.get("git"), "config": config, "overrides": overrides},
  })
  return out


def split_check(torch_run: dict | None, jax_run: dict | None) -> dict:
  """Compares the hashes of the rows each side actually used (bench/row_hash.py): what
  bench/torch_anchor.py built its tensors from, and what jaxclf's training loop was handed
  (bench/jax_rows.py). match: every split of both sides hashed, and each the same."""
  torch_rows = ((torch_run or {}).get("data") or {}).get("rows_sha256")
  jax_rows = ((jax_run or {}).get("data_rows") or {}).get("rows_sha256")
  res: dict = {"match": None, "pytorch": torch_rows, "jaxclf": jax_rows}
  if not torch_rows or not jax_rows:
    return {**res, "note": "a side reported no row hashes: nothing to compare"}
  splits = sorted(set(torch_rows) | set(jax_rows))
  res["per_split"] = {k: torch_rows.get(k) is not None and torch_rows.get(k) == jax_rows.get(k)
                      for k in splits}
  res["match"] = all(res["per_split"].values())
  res["counts"] = {"pytorch": (torch_run.get("data") or {}).get("counts"),
                   "jaxclf": (jax_run.get("data_rows") or {}).get("counts")}
  return res


# ------------------------------------------------------------------------------------- summary
def _ms(vals):
  vals = [v for v in vals if v is not None]
  if not vals:
    return None
  return {"mean": round(statistics.mean(vals), 4),
          "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0, "n": len(vals)}


FIELDS = ("test_accuracy", "best_val_accuracy", "final_val_accuracy", "wall_s",
          "time_to_target_s", "images_per_s", "train_images_per_s", "test_ece")


def summarize(runs: dict) -> dict:
  out: dict = {}
  for side in ("pytorch", "jaxclf"):
    rs = [r for r in runs.get(side, {}).values() if "error" not in r]
    if rs:
      out[side] = {f: _ms([r.get(f) for r in rs]) for f in FIELDS}
      out[side]["reached_target"] = sum(r.get("time_to_target_s") is not None for r in rs)
      out[side]["seeds"] = [r["seed"] for r in rs]
  loads = [r["load_avg_during"]["mean"] for side in runs.values() for r in side.values()
           if r.get("load_avg_during")]
  ncpu = os.cpu_count() or 1
  if loads and max(loads) > 1.75 * ncpu:
    out["warning"] = (f"the CPU was contended: mean 1-min load average up to {max(loads):.1f} "
                      f"on {ncpu} cores during a run (each side alone loads it to ~{ncpu}); "
                      "times and throughputs are not comparable to a quiet machine")
  t, j = out.get("pytorch"), out.get("jaxclf")
  if t and j:
    def ratio(f):
      if t[f] and j[f] and t[f]["mean"]:
        return round(j[f]["mean"] / t[f]["mean"], 3)
      return None
    per_seed = []
    for s, jr in runs["jaxclf"].items():
      tr = runs["pytorch"].get(s)
      if not tr or "error" in tr or "error" in jr:
        continue
      per_seed.append({
          "seed": jr["seed"],
          "wall_ratio": round(jr["wall_s"] / tr["wall_s"], 3),
          "time_to_target_ratio": round(jr["time_to_target_s"] / tr["time_to_target_s"], 3)
          if jr.get("time_to_target_s") and tr.get("time_to_target_s") else None,
          "test_accuracy_diff_points": round(100 * (jr["test_accuracy"] - tr["test_accuracy"]), 2)})
    out["jaxclf_over_pytorch"] = {
        "wall_s": ratio("wall_s"), "time_to_target_s": ratio("time_to_target_s"),
        "images_per_s": ratio("images_per_s"),
        "test_accuracy_diff_points": round(100 * (j["test_accuracy"]["mean"]
                                                  - t["test_accuracy"]["mean"]), 2),
        "per_seed": per_seed,
        "note": "ratios of means; > 1 in wall/time means jaxclf is slower; accuracy diff is "
                "jaxclf minus PyTorch, in percentage points",
    }
  return out


def portable(obj, workroot: str):
  """`obj` with the work root's and this checkout's absolute paths written as `<workroot>` and
  `<repo>` (the log still prints them)."""
  return scrub_paths(obj, {workroot: "<workroot>", ROOT: "<repo>"})


def _brief(r: dict) -> str:
  if "error" in r:
    return f"FAILED ({r['error']}); see {r['log']}"
  return f"test {r['test_accuracy']:.4f}, wall {r['wall_s']:.0f}s, to target {r['time_to_target_s']}"


def main() -> None:
  p = argparse.ArgumentParser(description="Race the PyTorch anchor against jaxclf's default "
                              "config (see the module docstring).")
  p.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
  p.add_argument("--quick", action="store_true", help="1 epoch per side (development)")
  p.add_argument("--target", type=float, default=0.93, help="val accuracy for time-to-target")
  p.add_argument("--out", default=os.path.join("docs", "results", "race.json"))
  p.add_argument("--only", choices=("torch", "jax"))
  p.add_argument("--torch-epochs", type=int, help="default 10 (1 under --quick)")
  p.add_argument("--jax-config", default=DEFAULT_JAX_CONFIG, help="PATH[:arg]")
  p.add_argument("--jax-set", action="append", default=[], metavar="KEY=VALUE",
                 help="passed to jaxclf as --config.KEY=VALUE (repeatable)")
  p.add_argument("--workroot", help="where the runs' workdirs/logs go (default: a fresh tmp dir)")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  torch_epochs = a.torch_epochs or (1 if a.quick else 10)
  for kv in a.jax_set:
    if "=" not in kv:
      p.error(f"--jax-set expects KEY=VALUE, got {kv!r}")
  workroot = a.workroot or tempfile.mkdtemp(prefix="jaxclf_race_")
  os.makedirs(workroot, exist_ok=True)
  out_path = a.out if os.path.isabs(a.out) else os.path.join(ROOT, a.out)

  result = {
      "bench": "race", "target": a.target, "quick": a.quick, "seeds": seeds, "only": a.only,
      "order": "per seed: PyTorch, then jaxclf",
      "argv": sys.argv[1:], "workroot": workroot,
      "env": {"git": _git(), "python": platform.python_version(), "platform": platform.platform(),
              "cpu": _cpu(), "cpu_count": os.cpu_count(), "torch": _version("torch"),
              "jax": _version("jax"), "jaxlib": _version("jaxlib"), "flax": _version("flax"),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "load_avg_start": os.getloadavg(),
              "start": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
      "sides": {
          "pytorch": {"script": "bench/torch_anchor.py", "epochs": torch_epochs},
          "jaxclf": {"config": a.jax_config, "overrides": a.jax_set,
                     "epochs": 1 if a.quick else "from config"}},
      "runs": {"pytorch": {}, "jaxclf": {}}, "split_check": {},
  }

  def save():
    result["summary"] = summarize(result["runs"])
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(portable(result, workroot), f, indent=2)
    os.replace(tmp, out_path)

  for s in seeds:
    tr = jr = None
    if a.only != "jax":
      tr = result["runs"]["pytorch"][str(s)] = run_torch(s, torch_epochs, a.target, workroot)
      log(f"torch seed {s}: {_brief(tr)}")
      save()
    if a.only != "torch":
      jr = result["runs"]["jaxclf"][str(s)] = run_jax(s, a.jax_config, a.jax_set, a.quick,
                                                       a.target, workroot)
      log(f"jaxclf seed {s}: {_brief(jr)}")
      save()
    if tr and jr:
      try:
        result["split_check"][str(s)] = split_check(tr, jr)
      except Exception as e:  # noqa: BLE001 - a failed check is reported, not fatal
        result["split_check"][str(s)] = {"match": None, "error": f"{type(e).__name__}: {e}"}
  result["env"]["load_avg_end"] = os.getloadavg()
  result["env"]["end"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  save()
  print(json.dumps(result, indent=2))
  log(f"wrote {out_path}")


if __name__ == "__main__":
  main()
