"""The workflows mean what they say: each step that branches on a `jaxclf` exit code, run as the
runner runs it (its shell text read from the YAML, `bash --noprofile --norc -eo pipefail`) against
a stub `jaxclf` on PATH that exits 0, 1 or 2; and the release's deploy step, run against the real
`kubectl kustomize` (from .venv-lint) with `kubectl apply` captured, renders the prod overlay with
the release's images.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
KUBECTL = REPO / ".venv-lint" / "bin" / "kubectl"
# GitHub's command line for `shell: bash` on Linux runners.
RUNNER_BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


def workflow(name: str) -> dict:
  return yaml.safe_load((WORKFLOWS / name).read_text())


def step(wf: dict, job: str, *, id: str | None = None, name: str | None = None) -> dict:
  for s in wf["jobs"][job]["steps"]:
    if (id and s.get("id") == id) or (name and s.get("name") == name):
      return s
  raise AssertionError(f"no step {id or name!r} in job {job}")


def run_step(wf: dict, s: dict, tmp: Path, env: dict[str, str], cwd: Path,
             path_first: Path) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
  """The step's `run:` under the runner's bash, with the workflow's and the step's `env:` (their
  `${{ }}` values given by `env`), and GITHUB_OUTPUT read back as a dict."""
  assert wf.get("defaults", {}).get("run", {}).get("shell", "bash") == "bash"
  script = s["run"]
  assert "${{" not in script, "expressions belong in env:, so the shell here is the shell there"
  out = tmp / "github_output"
  out.write_text("")
  names = {**wf.get("env", {}), **s.get("env", {})}
  full = {"PATH": f"{path_first}:{REPO / '.venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp),
          "GITHUB_OUTPUT": str(out), "GITHUB_RUN_ID": "4242", "RUNNER_TEMP": str(tmp)}
  full.update({k: env.get(k, "") for k in names})
  full.update(env)
  path = tmp / "step.sh"
  path.write_text(script)
  r = subprocess.run([*RUNNER_BASH, str(path)], cwd=cwd, env=full, capture_output=True, text=True,
                     timeout=120)
  outputs = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
  return r, outputs


def stub_jaxclf(tmp: Path, rc: int) -> Path:
  """A `jaxclf` that records its arguments, prints a JSON line and exits `rc`."""
  bin_dir = tmp / "stub-bin"
  bin_dir.mkdir(exist_ok=True)
  exe = bin_dir / "jaxclf"
  exe.write_text(f'#!/bin/sh\necho "$@" >> "{tmp}/jaxclf.calls"\n'
                 f'echo \'{{"stub_exit": {rc}}}\'\nexit {rc}\n')
  exe.chmod(0o755)
  return bin_dir


# ------------------------------------------------------------------------- retrain.yml

@pytest.mark.parametrize("rc, force, want", [
    (0, "", "true"), (1, "", "false"), (2, "", None),
    (0, "true", "true"), (1, "true", "true"), (2, "true", None), (1, "false", "false")])
def test_retrain_dataset_changed_branches_on_each_exit_code(tmp_path, rc, force, want):
  wf = workflow("retrain.yml")
  s = step(wf, "retrain", id="changed")
  r, outputs = run_step(wf, s, tmp_path, {"MODEL_NAME": "fashion", "FORCE": force}, tmp_path,
                        stub_jaxclf(tmp_path, rc))
  assert "registry dataset-changed fashion" in (tmp_path / "jaxclf.calls").read_text()
  if want is None:  # an error fails the job and decides nothing
    assert r.returncode != 0 and "retrain" not in outputs, (r.returncode, outputs, r.stdout)
    assert f"dataset-changed failed (exit {rc})" in r.stdout
  else:
    assert r.returncode == 0, r.stdout + r.stderr
    assert outputs == {"retrain": want}


@pytest.mark.parametrize("rc, want", [(0, "true"), (1, "false"), (2, None), (137, None)])
def test_retrain_gate_branches_on_each_exit_code(tmp_path, rc, want):
  wf = workflow("retrain.yml")
  s = step(wf, "retrain", id="gate")
  assert s["if"] == "steps.changed.outputs.retrain == 'true'"
  shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # the step reads the gate's numbers
  r, outputs = run_step(wf, s, tmp_path, {"MODEL_NAME": "fashion"}, tmp_path,
                        stub_jaxclf(tmp_path, rc))
  call = (tmp_path / "jaxclf.calls").read_text()
  gate = yaml.safe_load((REPO / "params.yaml").read_text())["gate"]
  assert f"--floor {gate['floor']} --min-delta {gate['min_delta']}" in call, call
  assert (tmp_path / "gate.json").read_text().strip() == f'{{"stub_exit": {rc}}}'
  if want is None:
    assert r.returncode != 0 and "promoted" not in outputs, (r.returncode, outputs, r.stdout)
    assert f"gate failed (exit {rc})" in r.stdout
  else:
    assert r.returncode == 0, r.stdout + r.stderr
    assert outputs == {"promoted": want}


def test_retrain_deploys_only_on_promotion_and_installs_the_cuda_lock():
  wf = workflow("retrain.yml")
  job = wf["jobs"]["retrain"]
  assert job["outputs"]["promoted"] == "${{ steps.gate.outputs.promoted }}"
  assert wf["jobs"]["deploy"]["if"] == "needs.retrain.outputs.promoted == 'true'"
  assert "gpu" in job["runs-on"]
  setup = step(wf, "retrain", name="Environments")["run"]
  assert "pip install --quiet -r requirements/cuda-lock.txt" in setup
  assert setup.index("scripts/setup.sh") < setup.index("cuda-lock.txt")


# ------------------------------------------------------------------------- deploy.yml

def fake_kubectl(tmp: Path) -> Path:
  """kubectl whose `kustomize` is the real one (.venv-lint) and whose `apply -f FILE` keeps FILE
  as applied.yaml; `rollout` succeeds. No cluster is reached."""
  if not KUBECTL.exists():
    pytest.fail(f"{KUBECTL} missing: run scripts/setup_lint_env.sh (scripts/test.sh does)")
  bin_dir = tmp / "kubectl-bin"
  bin_dir.mkdir()
  exe = bin_dir / "kubectl"
  exe.write_text(f"""#!/bin/sh
case "$1" in
  kustomize) exec "{KUBECTL}" "$@" ;;
  apply) [ "$2" = -f ] && cp "$3" "{tmp}/applied.yaml" ;;
  -n) exit 0 ;;
  *) echo "unexpected kubectl $*" >&2; exit 3 ;;
esac
""")
  exe.chmod(0o755)
  (bin_dir / "python3").symlink_to(sys.executable)
  return bin_dir


def images(manifests: str) -> list[str]:
  out = []
  for doc in yaml.safe_load_all(manifests):
    spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
    for c in spec.get("initContainers", []) + spec.get("containers", []):
      out.append(c["image"])
  return out


def run_release_step(tmp: Path, tag: str, edit=None) -> tuple[subprocess.CompletedProcess, Path]:
  wf = workflow("deploy.yml")
  s = step(wf, "deploy", name="Apply the prod overlay")
  assert s["if"] == "inputs.action == 'apply'"
  checkout = tmp / "checkout"  # the step edits the overlay: a copy of the checkout's deploy/
  shutil.copytree(REPO / "deploy", checkout / "deploy")
  if edit:
    edit(checkout)
  r, _ = run_step(wf, s, tmp, {"TAG": tag, "OWNER": "acme"},
                  checkout / s["working-directory"], fake_kubectl(tmp))
  return r, tmp / "applied.yaml"


def test_release_step_renders_every_prod_image_with_the_release_tag(tmp_path):
  tag = "0123456789abcdef0123456789abcdef01234567"
  r, applied = run_release_step(tmp_path, tag)
  assert r.returncode == 0, r.stdout + r.stderr
  found = images(applied.read_text())
  print("rendered prod images:", *sorted(set(found)), sep="\n  ")
  assert len(found) == 3  # Triton, its model-repository init container, the gateway
  assert set(found) == {f"ghcr.io/acme/jaxclf-gateway:{tag}", f"ghcr.io/acme/jaxclf-triton:{tag}"}


def test_release_step_applies_nothing_when_an_image_misses_the_tag(tmp_path):
  """The step's own guard: a base whose images the overlay's overrides no longer match (here the
  base renamed) leaves the old tag in the render, and the step fails before `kubectl apply`."""
  base = REPO / "deploy" / "k8s" / "base" / "kustomization.yaml"
  renamed = base.read_text().replace("newName: ghcr.io/jaxclf/jaxclf-triton",
                                     "newName: ghcr.io/elsewhere/jaxclf-triton")
  assert renamed != base.read_text()
  r, applied = run_release_step(
      tmp_path, "v9.9.9",
      edit=lambda checkout: (checkout / "deploy/k8s/base/kustomization.yaml").write_text(renamed))
  assert r.returncode != 0 and not applied.exists(), r.stdout + r.stderr
  assert re.search(r"image: ghcr\.io/elsewhere/jaxclf-triton:0\.1\.0", r.stdout), r.stdout
  assert "do not carry the release tag v9.9.9" in r.stdout


def test_set_images_refuses_a_malformed_override(tmp_path):
  shutil.copytree(REPO / "deploy" / "k8s", tmp_path / "k8s")
  r = subprocess.run([sys.executable, str(REPO / "deploy" / "k8s" / "set_images.py"),
                      str(tmp_path / "k8s" / "overlays" / "prod"), "jaxclf-gateway:latest"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert "'jaxclf-gateway:latest': expected NAME=NEW_NAME:TAG" in r.stderr
