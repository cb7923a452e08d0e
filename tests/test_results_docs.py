"""The figures the docs quote are the committed JSON's: every `docs/results/*.json` a doc names
exists and parses, every row of docs/results.md's table holds the value at its key rounded as
written, and the README's results table quotes only figures of that table."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(ROOT, "docs", "results.md")
# A row: | what | figure | [name](relative/path.json) | `key.path` |
ROW = re.compile(r"^\| (?P<what>[^|]+) \| (?P<figure>[^|]+) \| \[[^\]]+\]\((?P<json>[^)]+\.json)\) "
                 r"\| `(?P<key>[^`]+)` \|$", re.M)
FIGURE = re.compile(r"^(?P<number>-?[0-9][0-9,]*(?:\.(?P<decimals>[0-9]+))?)\s*(?P<unit>%|pts|s|x)?$")
MARKDOWN = ("README.md", "docs/**/*.md", "bench/README.md")


def _lookup(data, key: str):
  for part in key.split("."):
    data = data[int(part)] if isinstance(data, list) else data[part]
  return data


def check_row(figure: str, value, key: str) -> str | None:
  """None when `figure` (e.g. '81.2%', '1,070', '166 s', '36.9 pts') is `value` rounded to the
  figure's decimals (% and pts: value x 100); else a one-line reason."""
  m = FIGURE.match(figure.strip())
  if not m:
    return f"figure {figure!r} is not a number with an optional %, pts, s or x"
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return f"{key} is {value!r}, not a number"
  scaled = value * 100 if m["unit"] in ("%", "pts") else value
  decimals = len(m["decimals"] or "")
  written = float(m["number"].replace(",", ""))
  # The figure is a rounding of the value: within half a unit of its last digit (float slack).
  if abs(written - scaled) > 0.5 * 10 ** -decimals + 1e-9:
    return f"{figure!r} but {key} = {value!r} (rounds to {round(scaled, decimals)})"
  return None


def table_rows(text: str):
  return list(ROW.finditer(text))


def check_table(text: str, base: str) -> list[str]:
  problems = []
  for row in table_rows(text):
    path = os.path.normpath(os.path.join(base, row["json"]))
    try:
      with open(path, encoding="utf-8") as f:
        value = _lookup(json.load(f), row["key"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
      problems.append(f"{row['what'].strip()}: {row['json']} {row['key']}: {type(e).__name__} {e}")
      continue
    reason = check_row(row["figure"], value, row["key"])
    if reason:
      problems.append(f"{row['what'].strip()}: {row['json']}: {reason}")
  return problems


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_every_figure_of_the_results_table_is_its_jsons():
  text = _read(RESULTS_MD)
  assert len(table_rows(text)) >= 30, "docs/results.md: the table's rows no longer parse"
  problems = check_table(text, os.path.dirname(RESULTS_MD))
  assert not problems, "\n".join(problems)


def test_a_wrong_figure_is_caught():
  text = _read(RESULTS_MD).replace("| 81.2% | [photo_race.json]", "| 81.4% | [photo_race.json]", 1)
  problems = check_table(text, os.path.dirname(RESULTS_MD))
  assert problems == ["photo fine-tune race: jaxclf test accuracy, mean of 2 seeds: "
                      "results/photo_race.json: '81.4%' but summary.test_accuracy_mean.jaxclf "
                      "= 0.812 (rounds to 81.2)"]


@pytest.mark.parametrize("figure,value,ok", [
    ("81.2%", 0.812, True), ("1,070", 1069.7, True), ("166 s", 165.6, True),
    ("4.8 pts", 0.0475, True), ("1.00", 1.0, True), ("81.3%", 0.812, False),
    ("1,069", 1069.7, False), ("about 80", 80, False)])
def test_rounding_rule(figure, value, ok):
  assert (check_row(figure, value, "k") is None) is ok


def test_every_json_a_doc_links_exists_and_parses():
  linked = []
  for pattern in MARKDOWN:
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
      for target in re.findall(r"\]\(([^)#\s]+\.json)\)", _read(path)):
        if "://" not in target:
          linked.append((os.path.relpath(path, ROOT), target,
                         os.path.normpath(os.path.join(os.path.dirname(path), target))))
  assert any("results/" in t for _, t, _ in linked), "no doc links a docs/results/*.json"
  committed = glob.glob(os.path.join(ROOT, "docs", "results", "*.json"))
  problems = []
  for doc, target, path in linked + [("docs/results/", os.path.basename(p), p) for p in committed]:
    try:
      with open(path, encoding="utf-8") as f:
        json.load(f)
    except (OSError, ValueError) as e:
      problems.append(f"{doc} -> {target}: {type(e).__name__} {e}")
  assert not problems, "\n".join(problems)


def test_readme_results_are_figures_of_the_results_table():
  """Each figure in the README is a link to docs/results.md's table and one of its figures."""
  figures = {row["figure"].strip() for row in table_rows(_read(RESULTS_MD))}
  readme = _read(os.path.join(ROOT, "README.md"))
  quoted = re.findall(r"\[([^\]]+)\]\(docs/results\.md#the-table\)", readme)
  assert quoted, "README.md quotes no result from docs/results.md"
  missing = [q for q in quoted if q not in figures]
  assert not missing, f"README.md quotes figures that docs/results.md's table does not hold: {missing}"
