"""The docs stay true: generated references are fresh, docs/architecture.md names only paths
that exist, relative links between the docs resolve, the dataset card's class balance is the data's."""
from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen_docs():
  path = os.path.join(ROOT, "scripts", "gen_docs.py")
  spec = importlib.util.spec_from_file_location("gen_docs", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _read(rel: str) -> str:
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("target", ["cli", "openapi", "config"])
def test_generated_reference_is_fresh(target):
  gen = _gen_docs()
  rel, render = gen.TARGETS[target]
  assert _read(rel) == render(), f"{rel} is stale: run .venv/bin/python scripts/gen_docs.py"


def test_every_config_key_has_a_meaning_and_every_rule_a_key():
  """The config reference's source: a one-line meaning at each key's definition in defaults.py,
  and validate.py's ranges and choices naming only keys that exist."""
  from jaxclf.config.reference import key_docs
  from jaxclf.config.validate import CHOICES, RANGES
  rows = key_docs()
  assert len(rows) > 80
  assert [r.key for r in rows if not r.meaning] == []
  keys = {r.key for r in rows}
  assert not (set(RANGES) | set(CHOICES)) - keys
  page = _read("docs/config.md")
  assert all(f"| `{k}` |" in page for k in keys)


def test_staleness_check_names_a_stale_file(tmp_path, monkeypatch):
  gen = _gen_docs()
  monkeypatch.setattr(gen, "ROOT", str(tmp_path))
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "cli.md").write_text(gen.render_cli() + "an edit by hand\n")
  assert gen.stale(["cli"]) == ["docs/cli.md"]
  assert gen.main(["--check", "cli"]) == 1
  assert gen.main(["cli"]) == 0 and gen.stale(["cli"]) == []


def test_cli_reference_covers_every_command():
  text = _read("docs/cli.md")
  for command in ("train", "data ingest", "evaluate", "export", "registry promote", "serve",
                  "predict", "sweep", "runs compare", "weights convert"):
    assert f"## `jaxclf {command}`" in text, command


# A path-like token: `dir/`, `dir/file.ext`, `file.py`. Names of other things (flags, keys,
# commands, URLs) do not match, or are filtered below.
_PATH = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-<>*]*)*$")
_FILE_EXT = (".py", ".json", ".yaml", ".yml", ".txt", ".sh", ".md", ".cc", ".h", ".toml", ".ipynb")


# Files that runs, exports and datasets contain (named as formats, not repository paths).
ARTIFACT_NAMES = {"manifest.json", "export.json", "labels.txt", "preprocessing.json",
                  "reference_stats.json", "run.json", "config.json", "metrics.json",
                  "data_report.json", "integrity.json", "report.html"}
# Where a bare name may live: the repository root, the packages and the deployment folders.
SEARCH = ["", "jaxclf", *(f"jaxclf/{d}" for d in sorted(os.listdir(os.path.join(ROOT, "jaxclf")))
                          if os.path.isdir(os.path.join(ROOT, "jaxclf", d))),
          ".github/workflows", "deploy/k8s", "deploy/k8s/base", "requirements"]


def _resolve(token: str, base: str) -> bool:
  token = token.rstrip("/")
  if any(ch in token for ch in "<>*") or os.path.basename(token) in ARTIFACT_NAMES:
    return True  # a pattern (`<name>/versions/<N>`) or a file inside an artefact
  for candidate in [os.path.join(base, token)] + [os.path.join(ROOT, d, token) for d in SEARCH]:
    if os.path.exists(candidate) or os.path.exists(candidate + ".py"):
      return True
  return False


def _module_map_tokens(text: str):
  """(token, base dir) for every file or folder named in the layout block of architecture.md."""
  block = text.split("## Layout", 1)[1].split("```", 2)[1]
  base = ROOT
  for line in block.splitlines():
    if not line.strip():
      continue
    indent = len(line) - len(line.lstrip())
    head = line.split()[0]
    if head.endswith("/"):  # a folder heading a line
      base = os.path.join(ROOT, head) if indent == 0 else os.path.join(ROOT, "jaxclf", head)
      yield head, ROOT if indent == 0 else os.path.join(ROOT, "jaxclf")
    elif indent and head.endswith(_FILE_EXT):
      yield head, os.path.join(ROOT, "jaxclf")
    # Files listed in the description column: `state.py, steps.py, ...`.
    for word in re.findall(r"[A-Za-z0-9_\-./]+\.(?:py|cc|h|json|sh)\b", line.split(None, 1)[-1]):
      yield word, base


def test_architecture_names_only_paths_that_exist():
  text = _read("docs/architecture.md")
  missing = []
  for token, base in _module_map_tokens(text):
    if not _resolve(token, base):
      missing.append(token)
  for token in re.findall(r"`([^`\s]+)`", text):
    token = token.split(":")[0]
    if ("/" in token or token.endswith(_FILE_EXT)) and _PATH.match(token) \
        and not token.startswith(("http", "--", "/", "s3", "gs", "registry", "nvcr.io")) \
        and not _resolve(token, ROOT):
      missing.append(token)
  assert not missing, f"docs/architecture.md names paths that do not exist: {sorted(set(missing))}"


def test_architecture_check_catches_a_missing_module(tmp_path):
  text = _read("docs/architecture.md").replace("cli.py ", "no_such_module.py ", 1)
  assert any(not _resolve(t, b) for t, b in _module_map_tokens(text))


def test_relative_links_between_docs_resolve():
  broken = []
  for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
    for name in files:
      if not name.endswith(".md"):
        continue
      path = os.path.join(folder, name)
      with open(path, encoding="utf-8") as f:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read()):
          if "://" not in target and not os.path.exists(os.path.join(folder, target)):
            broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
  assert not broken, broken


def test_dataset_card_class_balance_is_the_datas():
  from jaxclf.config import default_config
  from jaxclf.data.dataset import load_dataset
  dataset = load_dataset(default_config().data)
  card = _read("docs/datasets/fashion_mnist.md")
  for split in ("train", "val", "test"):
    counts = np.bincount(dataset.split(split).labels, minlength=dataset.num_classes)
    assert len(set(counts.tolist())) == 1, f"{split} is not balanced: the card says it is"
    row = f"| {split} | {counts[0]:,} | {counts.sum():,} |"
    assert row in card, f"dataset card: expected the row {row!r}"


def test_api_reference_builds(tmp_path):
  """pdoc renders a module's docstrings (a light one here; the whole set: the slow test)."""
  pages = _gen_docs().build_api(str(tmp_path), ["jaxclf.calibration"])
  assert "jaxclf/calibration.html" in pages
  html = (tmp_path / "jaxclf" / "calibration.html").read_text()
  assert "fit_temperature" in html and "Temperature" in html


@pytest.mark.slow
def test_api_reference_of_every_public_module_builds(tmp_path):
  gen = _gen_docs()
  pages = gen.build_api(str(tmp_path))
  for module in gen.API_MODULES:
    assert module.replace(".", "/") + ".html" in pages, module


def test_getting_started_walkthrough_script_runs_every_command_of_the_page():
  """scripts/getting_started.sh (which measured the page's wall times) runs each step's command
  as the page writes it: the table and the script cannot drift apart."""
  rows = re.findall(r"^\| (\d) \| [^|]+ \| `([^`]+)` \|", _read("docs/getting_started.md"), re.M)
  assert [n for n, _ in rows] == [str(i) for i in range(1, 9)]
  script = _read("scripts/getting_started.sh").replace('\\"', '"').replace("$PORT", "8000")
  for n, command in rows[1:]:  # step 1 clones <repo-url>: the script clones its argument
    assert command in script or command.replace("curl ", "curl -sS ") in script, (n, command)
