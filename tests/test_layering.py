"""The import graph of jaxclf/ read from the source (ast; nothing is imported): no cycles, and the
training core (train, models, data, config) never reaches serving, export, ONNX or MLflow when
its modules are imported.

Edges are every `import` / `from ... import` of a jaxclf module, at module level or inside a
function (a deferred import still makes the two modules depend on each other), and importing
`a.b.c` also runs the packages `a` and `a.b`.
"""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("jaxclf.train", "jaxclf.models", "jaxclf.data", "jaxclf.config")
# Modules and third-party packages that belong to the edges of the system (docs/architecture.md).
EDGE_MODULES = ("jaxclf.export", "jaxclf.deploy", "jaxclf.registry", "jaxclf.sweeps",
                "jaxclf.tracking.mlflow_bridge")
EDGE_PACKAGES = ("serving", "onnx", "onnxruntime", "jax2onnx", "mlflow", "tritonclient",
                 "pytriton", "fastapi", "uvicorn")
# Cycles known and accepted, as sorted tuples of module names, each with the reason. Empty.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def module_files() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(os.path.join(REPO, "jaxclf")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def imported_names(module: str, path: str, module_level_only: bool) -> set[str]:
  """Absolute dotted names `module` imports (for `from a import b`: both `a` and `a.b`)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  nodes = tree.body if module_level_only else ast.walk(tree)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  names = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from . import x / from ..y import z
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names |= {base} | {f"{base}.{a.name}" for a in node.names}
  return names


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
  """module -> the jaxclf modules (and packages) importing it runs."""
  files = module_files()
  graph = {}
  for module, path in files.items():
    own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
    edges = set()
    for name in imported_names(module, path, module_level_only):
      while name:  # a.b.c runs a.b.c, a.b and a; a name inside a module (a.b.func) is a.b's
        if name in files and name not in own:
          edges.add(name)
        name = name.rpartition(".")[0]
    graph[module] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(tuple(sorted(component)))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_reader_finds_a_cycle(tmp_path):
  """The checker itself: two modules that import each other (one inside a function) are a
  cycle; a one-way pair is not."""
  graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
  assert cycles(graph) == [("a", "b")]
  assert cycles({"a": {"b"}, "b": set()}) == []
  assert import_graph(False)["jaxclf.data.dataset"] >= {"jaxclf.data.sources.fashion_mnist",
                                                       "jaxclf.data.types"}


def test_no_import_cycles_within_jaxclf():
  found = {c for c in cycles(import_graph(module_level_only=False))}
  unexpected = sorted(found - set(KNOWN_CYCLES))
  assert unexpected == [], ("modules that import each other (move what both need into a module "
                            f"below them): {unexpected}")
  assert sorted(set(KNOWN_CYCLES) - found) == [], "a known cycle is gone: remove it from the list"


def test_the_training_core_imports_no_serving_export_onnx_or_mlflow_module():
  """What importing any core module runs, following module-level imports through jaxclf/."""
  graph = import_graph(module_level_only=True)
  files = module_files()
  packages = {m: {n.split(".")[0] for n in imported_names(m, files[m], True)} & set(EDGE_PACKAGES)
              for m in files}
  problems = set()
  for start in sorted(m for m in graph if _under(m, CORE)):
    seen, todo = {start}, [start]
    while todo:
      module = todo.pop()
      problems |= {f"{start} -> ... {module} imports {p}" for p in packages[module]}
      for dep in graph[module]:
        if _under(dep, EDGE_MODULES):
          problems.add(f"{start} -> ... {module} imports {dep}")
        elif dep not in seen:
          seen.add(dep)
          todo.append(dep)
  assert not problems, "\n".join(sorted(problems))


# Packages that may not import the layers above them, with those layers. Orchestration (deploy/,
# sweeps/) and serving/ sit above export/ and registry/ (the `export` and `registry` commands are
# jaxclf/deploy/cli.py), and a tracked training run is not part of a sweep.
UPWARD_IMPORTS = {
    "jaxclf.export": ("jaxclf.deploy", "jaxclf.sweeps", "serving"),
    "jaxclf.registry": ("jaxclf.deploy", "jaxclf.sweeps", "serving"),
    "jaxclf.tracking": ("jaxclf.sweeps",),
}


def upward_imports(files: dict[str, str], rules: dict[str, tuple[str, ...]]) -> list[str]:
  """'module imports name' for every import (module level or inside a function) that a rule
  forbids to the package `module` is in."""
  problems = []
  for module, path in sorted(files.items()):
    for package, above in rules.items():
      if _under(module, (package,)):
        problems += [f"{module} imports {name}"
                     for name in sorted(imported_names(module, path, module_level_only=False))
                     if _under(name, above)]
  return problems


def test_the_upward_import_check_finds_a_deferred_import(tmp_path):
  """The checker itself: an import inside a function, a relative import and a top-level one
  each count; the same imports in a package the rule does not cover do not."""
  bad = tmp_path / "bad.py"
  bad.write_text("import json\nfrom ..deploy import sync\n\n\ndef f():\n"
                 "  from jaxclf.sweeps.runner import run\n  import serving.app\n")
  files = {"jaxclf.export.bad": str(bad), "jaxclf.deploy.fine": str(bad)}
  assert upward_imports(files, UPWARD_IMPORTS) == [
      "jaxclf.export.bad imports jaxclf.deploy", "jaxclf.export.bad imports jaxclf.deploy.sync",
      "jaxclf.export.bad imports jaxclf.sweeps.runner",
      "jaxclf.export.bad imports jaxclf.sweeps.runner.run", "jaxclf.export.bad imports serving.app"]


def test_export_registry_and_tracking_import_nothing_from_the_layers_above():
  problems = upward_imports(module_files(), UPWARD_IMPORTS)
  assert not problems, ("a lower layer reaching up (move the code that needs both into the layer "
                        "above, e.g. jaxclf/deploy/):\n" + "\n".join(problems))
