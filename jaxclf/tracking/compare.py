"""`jaxclf runs list|compare`: run.json records side by side.

  jaxclf runs list sweeps/s2 [--sort val_accuracy]      every run under a directory
  jaxclf runs compare sweeps/s2/trials/* [--html compare.html] [--png curves.png] [--json]

compare gives a hyperparameter diff (only the keys that differ), a metric table and the val curves
of every run overlaid, as a PNG and as a self-contained HTML page (the PNG inlined, no external
requests). Reads run records only: no training code.
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import os
import sys
from typing import Any

HPARAM_SECTIONS = ("optimizer", "schedule", "train", "model", "augment", "data", "preprocessing",
                   "early_stopping", "seed")
_NOT_HPARAMS = ("data.source", "data.cache_dir", "train.progress_bar", "data.read_threads",
                "data.prefetch_batches", "data.worker_processes", "periodic.log",
                "periodic.checkpoint", "periodic.image_summary")


def summarize(record: dict[str, Any], run_dir: str) -> dict[str, Any]:
  m = record.get("metrics") or {}
  return {"run": run_dir, "name": record.get("name"), "status": record.get("status"),
          "model": (record.get("model") or {}).get("name"),
          "dataset_version": (record.get("dataset") or {}).get("version"),
          "val_accuracy": (m.get("val") or {}).get("accuracy"),
          "val_loss": (m.get("val") or {}).get("loss"),
          "test_accuracy": (m.get("test") or {}).get("accuracy"),
          "duration_s": record.get("duration_s"), "git": (record.get("git") or {}).get("commit"),
          "epochs": len(record.get("history") or []),
          "history": [{k: h.get(k) for k in ("epoch", "val_accuracy", "val_loss")}
                      for h in record.get("history") or []],
          "hparams": {k: v for k, v in (record.get("config") or {}).items()
                      if k.split(".")[0] in HPARAM_SECTIONS and k not in _NOT_HPARAMS}}


# The columns `--sort` can order by (numbers all); accuracies sort best first, the rest ascending.
SORT_KEYS = ("val_accuracy", "test_accuracy", "val_loss", "duration_s", "epochs")


def load_runs(paths: list[str], sort: str = "val_accuracy") -> list[dict[str, Any]]:
  if sort not in SORT_KEYS:  # an unknown key would sort nothing and say nothing
    raise ValueError(f"--sort {sort!r}: not a sortable column; one of {', '.join(SORT_KEYS)}")
  rows = []
  for p in paths:
    f = os.path.join(p, "run.json")
    if os.path.isfile(f):
      with open(f) as fh:
        rows.append(summarize(json.load(fh), p))
  descending = "accuracy" in sort
  rows.sort(key=lambda r: (r.get(sort) is None,
                           -(r.get(sort) or 0) if descending else (r.get(sort) or 0)))
  return rows


def find_runs(root: str) -> list[str]:
  return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "run.json"),
                                                      recursive=True))


def hparam_diff(rows: list[dict[str, Any]]) -> list[str]:
  keys = sorted({k for r in rows for k in r["hparams"]})
  return [k for k in keys if len({json.dumps(r["hparams"].get(k)) for r in rows}) > 1]


def _label(r: dict[str, Any]) -> str:
  return os.path.basename(r["run"].rstrip("/"))


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  differing = hparam_diff(rows)
  head = ["run", "status", "epochs", "val_acc", "val_loss", "test_acc", "time_s", "data_ver"] + \
      differing
  f4 = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
  body = [[_label(r), str(r["status"]), str(r["epochs"]), f4(r["val_accuracy"]), f4(r["val_loss"]),
           f4(r["test_accuracy"]), "-" if not r["duration_s"] else f"{r['duration_s']:.0f}",
           (r["dataset_version"] or "-")[:8]] + [json.dumps(r["hparams"].get(k)) for k in differing]
          for r in rows]
  return head, body


def print_table(rows: list[dict[str, Any]]) -> None:
  if not rows:
    print("no runs found (directories with run.json)")
    return
  head, body = table(rows)
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  for line in [head] + body:
    print("  ".join(x.ljust(w) for x, w in zip(line, widths)))


def curves_png(rows: list[dict[str, Any]]) -> bytes:
  """Val accuracy and val loss per epoch, one line per run, overlaid."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  for r in rows:
    epochs = [h["epoch"] for h in r["history"]]
    for ax, key in zip(axes, ("val_accuracy", "val_loss")):
      ax.plot(epochs, [h[key] for h in r["history"]], marker="o", markersize=3, label=_label(r))
  for ax, key in zip(axes, ("val accuracy", "val loss")):
    ax.set_xlabel("epoch")
    ax.set_title(key)
    ax.grid(alpha=0.3)
  if len(rows) <= 20:
    axes[0].legend(fontsize=7, loc="lower right")
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def html_page(rows: list[dict[str, Any]], png: bytes) -> str:
  head, body = table(rows)
  e = html.escape
  th = "".join(f"<th>{e(h)}</th>" for h in head)
  trs = "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
  same = sorted(set(k for r in rows for k in r["hparams"]) - set(hparam_diff(rows)))
  shared = "".join(f"<tr><td>{e(k)}</td><td>{e(json.dumps(rows[0]['hparams'].get(k)))}</td></tr>"
                   for k in same)
  img = base64.b64encode(png).decode()
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxclf run comparison</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;
font-size:13px}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
th{{background:#f2f2f2}} img{{max-width:100%}}</style></head><body>
<h1>Run comparison ({len(rows)} runs)</h1>
<section id="metrics"><h2>Metrics and differing hyperparameters</h2>
<p>Sorted as requested; test accuracy is the held-out split, never used for selection.</p>
<table><thead><tr>{th}</tr></thead><tbody>
{trs}
</tbody></table></section>
<section id="curves"><h2>Validation curves</h2>
<img alt="val curves" src="data:image/png;base64,{img}"></section>
<section id="shared"><h2>Hyperparameters all runs share</h2>
<table><tbody>{shared}</tbody></table></section>
</body></html>
"""


def _expand(paths: list[str]) -> list[str]:
  return [q for p in paths for q in (sorted(glob.glob(p)) or [p])]


def add_runs_commands(sub) -> None:
  r = sub.add_parser("runs", help="list and compare runs (run.json records)")
  rs = r.add_subparsers(dest="runs_command", required=True)
  ls = rs.add_parser("list", help="every run under a directory, as a table")
  ls.add_argument("root")
  c = rs.add_parser("compare", help="hyperparameter diff, metric table, overlaid val curves")
  c.add_argument("paths", nargs="+")
  for q in (ls, c):
    q.add_argument("--sort", default="val_accuracy", choices=SORT_KEYS,
                   help="the column to order by (accuracies best first, the rest ascending)")
    q.add_argument("--json", action="store_true")
  c.add_argument("--html", help="write a self-contained HTML page here")
  c.add_argument("--png", help="write the overlaid val curves here")

  def _show(rows, a):
    if a.json:
      json.dump(rows, sys.stdout, indent=2)
      print()
    else:
      print_table(rows)

  def _list(a):
    _show(load_runs(find_runs(a.root), a.sort), a)
    return 0

  def _compare(a):
    rows = load_runs(_expand(a.paths), a.sort)
    if (a.html or a.png) and rows:
      png = curves_png(rows)
      if a.png:
        with open(a.png, "wb") as f:
          f.write(png)
      if a.html:
        with open(a.html, "w") as f:
          f.write(html_page(rows, png))
    _show(rows, a)
    return 0 if rows else 1
  ls.set_defaults(func=_list)
  c.set_defaults(func=_compare)
