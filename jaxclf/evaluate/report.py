"""report.html: one self-contained page (inline CSS, plots as base64 data URIs, no scripts, no
external URLs) that opens offline and reads top to bottom: what was evaluated, how good it is
and how sure we are, where it fails, whether its confidence can be trusted, and how it trained.
"""
from __future__ import annotations

import base64
import html
from typing import Any, Mapping, Sequence

# Section ids, in page order; tests check each is rendered.
SECTIONS = {
    "summary": "Summary",
    "overall": "Overall metrics",
    "per-class": "Per-class metrics (ranked by F1)",
    "confusion": "Confusion matrix",
    "confused-pairs": "Most-confused pairs",
    "calibration": "Calibration",
    "curves": "Training curves",
    "errors": "Most confidently wrong",
    "discipline": "Test-set discipline",
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
  color:#1f2328;background:#f6f8fa;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px}
header h1{margin:0 0 4px;font-size:1.6em}
.sub{color:#57606a;margin:0 0 16px}
nav{margin:0 0 16px;font-size:.9em}
nav a{margin-right:12px;color:#0969da;text-decoration:none}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin:0 0 16px}
h2{font-size:1.2em;margin:0 0 12px}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:4px 10px;border-bottom:1px solid #eaeef2;text-align:right;vertical-align:middle}
th{background:#f6f8fa}
td.l,th.l{text-align:left}
.kv td:first-child{color:#57606a;text-align:left}
.kv td{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 12px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:150px}
.card .v{font-size:1.5em;font-weight:600}
.card .ci{color:#57606a;font-size:.85em}
.bar{display:inline-block;height:10px;background:#4c78a8;border-radius:2px;vertical-align:middle}
.warn{color:#9a6700}
.bad{background:#fff8c5}
img.plot{max-width:100%;height:auto;display:block;margin:8px 0}
.note{background:#ddf4ff;border-left:4px solid #0969da;padding:8px 12px}
code{font-size:.9em;background:#f6f8fa;padding:1px 4px;border-radius:4px}
"""


def _e(x: Any) -> str:
  return html.escape(str(x), quote=True)


def _pct(x: float | None, digits: int = 2) -> str:
  return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _img(png: bytes | None, alt: str) -> str:
  if not png:
    return f'<p class="warn">No {_e(alt)} available.</p>'
  data = base64.b64encode(png).decode("ascii")
  return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]], left: int = 1,
           row_class: Sequence[str] | None = None, css: str = "") -> str:
  """`left` leading columns are text (left-aligned); cells are escaped unless pre-rendered;
  no header row when `head` is None."""
  def cell(tag, i, v):
    cls = ' class="l"' if i < left else ""
    body = v.html if isinstance(v, _Raw) else _e(v)
    return f"<{tag}{cls}>{body}</{tag}>"
  out = [f'<table class="{css}">' if css else "<table>"]
  if head is not None:
    out += ["<thead><tr>", *(cell("th", i, h) for i, h in enumerate(head)), "</tr></thead>"]
  out.append("<tbody>")
  for r, row in enumerate(rows):
    cls = f' class="{row_class[r]}"' if row_class and row_class[r] else ""
    out.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
  out.append("</tbody></table>")
  return "".join(out)


class _Raw:
  def __init__(self, html_text: str):
    self.html = html_text


def _section(key: str, body: str) -> str:
  return f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>{body}</section>'


def _summary(doc: Mapping[str, Any]) -> str:
  m, d = doc["model"], doc["data"]
  t = doc["test"]
  rows = [
      ("model", m["uri"]),
      ("format", m["format"] + (f" ({m['checkpoint']} checkpoint)" if m.get("checkpoint") else "")),
      ("architecture", m.get("architecture") or "n/a"),
      ("training step", m["step"] if m["step"] is not None else "n/a"),
      ("model input", "x".join(map(str, m["input_shape"])) + f", {len(m['class_names'])} classes"),
      ("test data", d["source"]),
      ("dataset", d["name"]),
      ("dataset version", d["version"] or "n/a"),
      ("split", f"{d['split']} (figures below are test-split figures)"),
      ("examples scored", f"{t['num_examples']:,}"),
      ("files skipped", f"{len(d['skipped'])}" + (" (see list below)" if d["skipped"] else "")),
      ("evaluated at", doc["created_at"]),
  ]
  if m.get("sha256"):
    rows.insert(3, ("model sha256", m["sha256"]))
  body = _table(None, rows, left=2, css="kv")
  renamed = d.get("renamed_classes") or {}
  if renamed:
    body += ("<p>Test folders matched to model classes up to case and separators: " +
             _e(", ".join(f"{k} \u2192 {v}" for k, v in renamed.items())) + "</p>")
  absent = d.get("classes_without_examples") or []
  if absent:
    body += (f'<p class="warn">Model classes with no test example (support 0, left out of the '
             f'macro averages): {_e(", ".join(absent))}</p>')
  if d["skipped"]:
    shown = d["skipped"][:50]
    body += "<details><summary>Skipped files</summary>" + _table(
        ["file", "stage", "reason"], [(s.get("source"), s.get("stage"), s["reason"]) for s in shown],
        left=3) + (f"<p>... and {len(d['skipped']) - 50} more (metrics.json has them all)</p>"
                   if len(d["skipped"]) > 50 else "") + "</details>"
  return _section("summary", body)


def _overall(doc: Mapping[str, Any]) -> str:
  t = doc["test"]
  ci = t["confidence_intervals"]
  level = int(round(100 * ci["level"]))

  def card(name, value, interval=None, fmt=_pct):
    extra = (f'<div class="ci">{level}% CI {fmt(interval["low"])} \u2013 {fmt(interval["high"])}</div>'
             if interval else "")
    return f'<div class="card"><div>{_e(name)}</div><div class="v">{fmt(value)}</div>{extra}</div>'

  cards = [card("accuracy", t["accuracy"], ci["accuracy"]),
           card("macro F1", t["macro"]["f1"], ci["macro_f1"])]
  for k, v in t["top_k_accuracy"].items():
    if k != "1":
      cards.append(card(f"top-{k} accuracy", v))
  cards.append(card("log loss", t["log_loss"], fmt=lambda x: f"{x:.4f}"))
  cards.append(card("ECE", t["calibration"]["ece"], fmt=lambda x: f"{x:.4f}"))
  ts = t.get("temperature_scaling") or {}
  if ts.get("calibrated"):
    cards.append(card(f"ECE before calibration (T={ts['temperature']:.3g})", ts["ece_before"],
                      fmt=lambda x: f"{x:.4f}"))
  rows = [(avg, _pct(t[avg]["precision"]), _pct(t[avg]["recall"]), _pct(t[avg]["f1"]))
          for avg in ("macro", "weighted")]
  body = ('<div class="cards">' + "".join(cards) + "</div>" +
          _table(["average", "precision", "recall", "F1"], rows) +
          f'<p class="sub">Intervals: {_e(ci.get("method", "bootstrap"))}, {ci["n_resamples"]} '
          f'resamples of the {t["num_examples"]:,} test examples (seed {ci["seed"]}).</p>')
  val = doc.get("val")
  if val:
    loss = "n/a" if val.get("loss") is None else f"{val['loss']:.4f}"
    body += ('<p>Validation split, as recorded by training at step '
             f'{_e(val["step"])}: accuracy {_pct(val.get("accuracy"))}, loss {loss}. '
             'It is shown apart: the validation split chose the checkpoint, the test split did not.</p>')
  return _section("overall", body)


def _per_class(doc: Mapping[str, Any], f1_png: bytes | None) -> str:
  t = doc["test"]
  rows, classes = [], []
  present = [c for c in t["per_class"] if c["support"] > 0]
  worst = {c["name"] for c in sorted(present, key=lambda c: c["f1"])[:max(1, len(present) // 5)]}
  for c in sorted(t["per_class"], key=lambda c: c["rank"]):
    bar = _Raw(f'<span class="bar" style="width:{int(100 * c["f1"])}px"></span> {c["f1"]:.4f}')
    rows.append((c["rank"], c["name"], bar, f'{c["precision"]:.4f}', f'{c["recall"]:.4f}',
                 c["support"], c["predicted"]))
    classes.append("bad" if c["name"] in worst else "")
  body = _table(["rank", "class", "F1", "precision", "recall", "support", "predicted"], rows,
                left=2, row_class=classes).replace('<th>rank</th>', '<th class="l">rank</th>')
  body += '<p class="sub">Highlighted: the weakest fifth of the classes by F1.</p>'
  body += _img(f1_png, "per-class F1 chart")
  return _section("per-class", body)


def _confused_pairs(doc: Mapping[str, Any]) -> str:
  pairs = doc["test"]["most_confused_pairs"]
  if not pairs:
    return _section("confused-pairs", "<p>No misclassifications.</p>")
  rows = [(p["true"], p["predicted"], p["count"], _pct(p["share_of_true"])) for p in pairs]
  return _section("confused-pairs", _table(["true class", "predicted as", "count",
                                             "share of true class"], rows, left=2))


def _calibration(doc: Mapping[str, Any], png: bytes | None) -> str:
  c = doc["test"]["calibration"]
  verdict = ("over-confident" if c["mean_confidence"] > c["accuracy"] + 0.01 else
             "under-confident" if c["mean_confidence"] < c["accuracy"] - 0.01 else "well calibrated")
  body = (f'<p>ECE {c["ece"]:.4f} (max gap {c["mce"]:.4f}) over {c["n_bins"]} equal-width bins. '
          f'Mean top-1 confidence {_pct(c["mean_confidence"])} against accuracy '
          f'{_pct(c["accuracy"])}: <b>{verdict}</b> on average.</p>')
  ts = doc["test"].get("temperature_scaling") or {}
  if ts.get("calibrated"):
    body += (f'<p>Temperature scaling: logits divided by T = {ts["temperature"]:.4g} (fitted on '
             f'the validation split after training; applied by {_e(ts.get("applied_by") or "the model")}, '
             'so these are the confidences the served model returns). '
             f'ECE <b>{ts["ece_before"]:.4f} before</b> calibration, <b>{ts["ece_after"]:.4f} after</b>'
             + (f'; NLL {ts["nll_before"]:.4f} before, {ts["nll_after"]:.4f} after'
                if "nll_before" in ts else "") + '. Accuracy is unchanged (T does not move the argmax).</p>')
  elif ts:
    body += '<p>No temperature scaling (T = 1): these are the raw model confidences.</p>'
  body += _img(png, "reliability diagram")
  return _section("calibration", body)


def _curves(doc: Mapping[str, Any], png: bytes | None) -> str:
  if png is None:
    reason = ("the model has no run directory (an export evaluated on its own)"
              if not doc["model"].get("run_dir") else "the run has no TensorBoard scalars under tb/")
    return _section("curves", f'<p class="warn">No training curves: {_e(reason)}.</p>')
  return _section("curves", "<p>Read from the run's TensorBoard event files; the dotted line is "
                  "the evaluated checkpoint.</p>" + _img(png, "training curves"))


def _errors(doc: Mapping[str, Any], png: bytes | None) -> str:
  wrong = doc["test"]["most_confidently_wrong"]
  if not wrong:
    return _section("errors", "<p>No misclassified test examples.</p>")
  rows = [(i + 1, w.get("source", w["index"]), w.get("true", w["true_index"]),
           w.get("predicted", w["predicted_index"]), _pct(w["confidence"], 1),
           _pct(w.get("prob_true"), 2)) for i, w in enumerate(wrong)]
  body = (_img(png, "gallery of confidently wrong images") +
          "<p class=\"sub\">Images as the model saw them (after resize and crop, before "
          "normalisation).</p>" +
          _table(["#", "example", "true", "predicted", "confidence", "p(true)"], rows, left=4))
  return _section("errors", body)


def _discipline(doc: Mapping[str, Any]) -> str:
  sel = doc["model_selection"]
  return _section("discipline", f'<p class="note">{_e(sel["note"])}</p>')


def render_report(doc: Mapping[str, Any], plots: Mapping[str, bytes | None]) -> str:
  """HTML for a metrics.json document and its plots (keys: confusion_matrix, reliability,
  per_class_f1, curves, error_gallery)."""
  title = f"Evaluation: {doc['model']['uri']} on {doc['data']['source']}"
  nav = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in SECTIONS.items())
  parts = [
      _summary(doc),
      _overall(doc),
      _per_class(doc, plots.get("per_class_f1")),
      _section("confusion", _img(plots.get("confusion_matrix"), "confusion matrix")),
      _confused_pairs(doc),
      _calibration(doc, plots.get("reliability")),
      _curves(doc, plots.get("curves")),
      _errors(doc, plots.get("error_gallery")),
      _discipline(doc),
  ]
  t = doc["test"]
  subtitle = (f"Test split \u00b7 {t['num_examples']:,} examples \u00b7 accuracy "
              f"{_pct(t['accuracy'])} \u00b7 macro F1 {_pct(t['macro']['f1'])}")
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
          # An empty data: favicon keeps the browser from requesting /favicon.ico (a 404 is a
          # console error when the report is served over HTTP).
          "<link rel=\"icon\" href=\"data:,\">"
          f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
          f"<header><h1>{_e(title)}</h1><p class=\"sub\">{_e(subtitle)}</p></header>"
          f"<nav>{nav}</nav>" + "".join(parts) +
          f"<footer class=\"sub\">jaxclf evaluate \u00b7 metrics.json schema_version "
          f"{_e(doc['schema_version'])}</footer></main></body></html>\n")


def write_report(path: str, doc: Mapping[str, Any], plots: Mapping[str, bytes | None]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(render_report(doc, plots))
