"""Deployment files, linted and validated without a Docker engine or a cluster, each with a
negative test showing the check catches a broken file:

  Dockerfiles          hadolint; healthcheck, non-root user, a .dockerignore that lets in every COPY
  compose.yaml         the compose-spec schema (check-jsonschema's vendored copy, offline)
  deploy/k8s           every kustomization rendered (kubectl kustomize), schema-validated against
                       Kubernetes 1.37 (kubernetes-validate, bundled schemas), policy-linted (checkov);
                       the multi-host JobSet against tests/schemas/jobset-v1alpha2.json (check-jsonschema)
                       and its Job templates against the Kubernetes schemas
  .github/workflows    actionlint

Tools: .venv-lint (scripts/setup_lint_env.sh, which scripts/test.sh runs) and hadolint from .venv.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LINT_BIN = REPO / ".venv-lint" / "bin"
K8S = REPO / "deploy" / "k8s"
DOCKERFILES = ["Dockerfile.train", "Dockerfile.serve", "deploy/triton/Dockerfile"]
COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml"]
# checkov checks that do not fit, and why:
CHECKOV_SKIPS = {
    # Tags are set per release (release.yml deploys the commit's images); digests are not known
    # before the images are built.
    "CKV_K8S_43": "image digests",
    # The code reads its settings from the environment (serving/settings.py JAXCLF_SERVE_*,
    # botocore's AWS_*): secrets reach it as environment variables by design.
    "CKV_K8S_35": "secrets as environment variables",
}


def tool(name: str) -> str:
  path = (Path(sys.executable).parent if name == "hadolint" else LINT_BIN) / name
  if not path.exists():
    pytest.fail(f"{path} missing: run scripts/setup_lint_env.sh (scripts/test.sh does)")
  return str(path)


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- Dockerfiles

@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
  r = run(tool("hadolint"), "--failure-threshold", "info", str(REPO / dockerfile))
  assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
  bad = tmp_path / "Dockerfile"
  bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y g++\n"
                 "RUN cd /app && pip install numpy\n")
  r = run(tool("hadolint"), "--failure-threshold", "info", str(bad))
  assert r.returncode != 0
  for rule in ("DL3007", "DL3008", "DL3003", "DL3013"):  # latest tag, apt pins, cd, pip pins
    assert rule in r.stdout, r.stdout


def final_stage(text: str) -> str:
  return re.split(r"(?m)^FROM ", text)[-1]


def copy_sources(text: str) -> list[str]:
  out = []
  for line in re.sub(r"\\\n", " ", text).splitlines():
    parts = line.split()
    if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
      out += [p for p in parts[1:-1] if not p.startswith("--")]
  return out


def dockerignore_admits(patterns: list[str], path: str) -> bool:
  """An allow-list .dockerignore ('*' then '!path' lines): is `path` in the build context?"""
  admitted = False
  for p in patterns:
    neg, pat = p.startswith("!"), p.lstrip("!").rstrip("/")
    if pat == "*" or path.rstrip("/") == pat or path.startswith(pat + "/"):
      admitted = neg
  return admitted


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_has_healthcheck_nonroot_user_and_a_dockerignore_for_its_copies(dockerfile):
  text = (REPO / dockerfile).read_text()
  last = final_stage(text)
  base_stage = final_stage(text.split("\nFROM mounted AS baked")[0])  # Triton: the runtime stage
  stage = last if "USER" in last else base_stage
  assert "HEALTHCHECK" in stage, f"{dockerfile}: no HEALTHCHECK in the final stage"
  users = re.findall(r"(?m)^USER (\S+)", stage)
  assert users and re.match(r"^[1-9]\d*:[1-9]\d*$", users[-1]), f"{dockerfile}: USER {users}"
  ignore = REPO / f"{dockerfile}.dockerignore"
  assert ignore.exists(), f"{ignore.relative_to(REPO)} missing"
  patterns = [l.strip() for l in ignore.read_text().splitlines()
              if l.strip() and not l.startswith("#")]
  assert patterns[0] == "*", "allow-list .dockerignore expected"
  for src in copy_sources(text):
    assert dockerignore_admits(patterns, src), f"{dockerfile}: COPY {src} is not in the context"
    assert (REPO / src).exists() or src.startswith("model_repository"), src
  for secret_or_bulk in (".venv/", ".git/", "runs/", "data/", "tests/"):
    assert not dockerignore_admits(patterns, secret_or_bulk), secret_or_bulk


def test_dockerignore_check_catches_a_missing_copy_source():
  assert not dockerignore_admits(["*", "!jaxclf/"], "configs/")
  assert dockerignore_admits(["*", "!jaxclf/"], "jaxclf/data/")


# ----------------------------------------------------------------------------- compose

def test_compose_files_match_the_compose_spec():
  r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
          *[str(REPO / f) for f in COMPOSE_FILES])
  assert r.returncode == 0, r.stdout + r.stderr


def test_compose_spec_check_catches_a_broken_compose_file(tmp_path):
  doc = yaml.safe_load((REPO / "compose.yaml").read_text())
  doc["services"]["gateway"]["healthcheck"] = {"test": ["CMD", "true"], "intervall": "5s"}
  doc["services"]["triton"]["ports"] = 8100
  bad = tmp_path / "compose.yaml"
  bad.write_text(yaml.safe_dump(doc))
  r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
  assert r.returncode != 0 and "intervall" in r.stdout + r.stderr, r.stdout


def serve_env_names() -> set[str]:
  import dataclasses
  from serving.settings import ENV_PREFIX, ServeSettings
  return {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServeSettings)}


def test_compose_and_k8s_use_the_variable_names_the_code_reads():
  known = serve_env_names()
  texts = {f: (REPO / f).read_text() for f in COMPOSE_FILES}
  texts.update({str(p.relative_to(REPO)): p.read_text() for p in K8S.rglob("*.yaml")})
  for name, text in texts.items():
    used = set(re.findall(r"\bJAXCLF_SERVE_[A-Z_]+\b", text))
    assert used <= known, f"{name}: {sorted(used - known)} are not ServeSettings fields"
  compose = yaml.safe_load(texts["compose.yaml"])
  env = compose["services"]["gateway"]["environment"]
  assert env["JAXCLF_SERVE_MODEL_PATH"].startswith("registry:") and env["JAXCLF_REGISTRY"]
  # Training reads JAXCLF_SECTION__KEY (and top-level keys) as config overrides: none may reach it.
  from jaxclf.config.loading import env_overrides
  train_env = yaml.safe_load((K8S / "jobs/kustomization.yaml").read_text())["configMapGenerator"][0]
  literals = dict(l.split("=", 1) for l in train_env["literals"])
  assert env_overrides(literals) == [], "a JAXCLF_* variable in the training ConfigMap"


# ----------------------------------------------------------------------------- Kubernetes

def kustomizations(root: Path) -> list[Path]:
  return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def referenced_files(kdir: Path) -> set[Path]:
  k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
  refs = set()
  for key in ("resources", "components", "patchesStrategicMerge"):
    for r in k.get(key) or []:
      refs.add((kdir / r).resolve())
  for p in k.get("patches") or []:
    if isinstance(p, dict) and p.get("path"):
      refs.add((kdir / p["path"]).resolve())
  return refs


def render(kdir: Path) -> str:
  r = run(tool("kubectl"), "kustomize", str(kdir))
  assert r.returncode == 0, f"kubectl kustomize {kdir}: {r.stderr}"
  return r.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
  out = tmp_path_factory.mktemp("rendered")
  files = {}
  for kdir in kustomizations(K8S):
    name = str(kdir.relative_to(K8S)).replace("/", "-")
    files[name] = out / f"{name}.yaml"
    files[name].write_text(render(kdir))
  return files


def test_every_yaml_under_deploy_k8s_is_rendered_or_standalone_valid(rendered, tmp_path):
  """Every file is a kustomization, a resource or patch of one, or (a standalone manifest, e.g.
  a Job another issue adds) schema-validated on its own."""
  covered = set()
  for kdir in kustomizations(K8S):
    covered |= referenced_files(kdir) | {(kdir / "kustomization.yaml").resolve()}
  standalone = [p for p in K8S.rglob("*.y*ml") if p.resolve() not in covered]
  if standalone:
    r = run(tool("kubernetes-validate"), "--strict", "--quiet", *map(str, standalone))
    assert r.returncode == 0, r.stdout + r.stderr
  assert {"overlays-dev", "overlays-prod", "base", "jobs"} <= set(rendered)


def test_rendered_manifests_match_the_kubernetes_schemas(rendered):
  r = run(tool("kubernetes-validate"), "--strict", "--quiet", *map(str, rendered.values()))
  assert r.returncode == 0, r.stdout + r.stderr


def checkov(directory: Path, only: tuple[str, ...] = ()) -> dict:
  select = ("--check", ",".join(only)) if only else ("--skip-check", ",".join(CHECKOV_SKIPS))
  r = run(tool("checkov"), "-d", str(directory), "--framework", "kubernetes", "-o", "json", *select)
  doc = json.loads(r.stdout)
  return doc[0] if isinstance(doc, list) else doc


def test_rendered_overlays_pass_checkov(rendered, tmp_path):
  # Overlays and jobs (what gets applied); the base alone has no namespace by design.
  for name, f in rendered.items():
    if name != "base":
      shutil.copy(f, tmp_path / f.name)
  result = checkov(tmp_path)
  failed = [(c["check_id"], c["resource"]) for c in result["results"]["failed_checks"]]
  assert not failed, failed
  assert result["summary"]["passed"] > 100


def test_probes_and_resources_are_wired(rendered):
  for overlay in ("overlays-dev", "overlays-prod"):
    docs = [d for d in yaml.safe_load_all(rendered[overlay].read_text()) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    triton = by[("Deployment", "jaxclf-triton")]["spec"]["template"]["spec"]
    gateway = by[("Deployment", "jaxclf-gateway")]["spec"]["template"]["spec"]
    assert triton["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert gateway["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for spec in (triton, gateway):
      for c in spec["containers"] + spec.get("initContainers", []):
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    assert ("HorizontalPodAutoscaler", "jaxclf-triton") in by
    assert ("PodDisruptionBudget", "jaxclf-triton") in by
    assert ("Ingress", "jaxclf-gateway") in by
  prod = [d for d in yaml.safe_load_all(rendered["overlays-prod"].read_text()) if d]
  triton = next(d for d in prod if d["kind"] == "Deployment" and d["metadata"]["name"] == "jaxclf-triton")
  assert triton["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
  assert not any(d["kind"] == "Secret" for d in prod), "prod Secrets are created out of band"


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
  dst = tmp_path / "k8s"
  shutil.copytree(K8S, dst)
  return dst


@pytest.mark.parametrize("old,new,message", [
    ("replicas: 2", "replica: 2", "replica"),  # an unknown field (--strict)
    ("containerPort: 8000", "containerPort: http", "containerPort"),  # a wrong type
])
def test_schema_validation_catches_a_broken_manifest(k8s_copy, tmp_path, old, new, message):
  gw = k8s_copy / "base" / "gateway.yaml"
  gw.write_text(gw.read_text().replace(old, new, 1))
  out = tmp_path / "prod.yaml"
  out.write_text(render(k8s_copy / "overlays" / "prod"))
  r = run(tool("kubernetes-validate"), "--strict", "--quiet", str(out))
  assert r.returncode != 0 and message in r.stdout + r.stderr, r.stdout + r.stderr


def test_kustomize_catches_a_broken_overlay(k8s_copy):
  k = k8s_copy / "overlays" / "prod" / "kustomization.yaml"
  k.write_text(k.read_text().replace("- namespace.yaml", "- no-such-file.yaml"))
  r = run(tool("kubectl"), "kustomize", str(k.parent))
  assert r.returncode != 0 and "no-such-file.yaml" in r.stderr


def test_checkov_catches_a_privileged_root_container(k8s_copy, tmp_path):
  t = k8s_copy / "base" / "triton.yaml"
  t.write_text(t.read_text().replace("allowPrivilegeEscalation: false",
                                     "allowPrivilegeEscalation: true\n            privileged: true")
               .replace("runAsNonRoot: true", "runAsNonRoot: false"))
  d = tmp_path / "rendered"
  d.mkdir()
  (d / "prod.yaml").write_text(render(k8s_copy / "overlays" / "prod"))
  failed = {c["check_id"] for c in checkov(d, only=("CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_23"))
            ["results"]["failed_checks"]}
  assert {"CKV_K8S_16", "CKV_K8S_20"} <= failed, failed  # privileged, privilege escalation


JOBSET_SCHEMA = REPO / "tests" / "schemas" / "jobset-v1alpha2.json"


def jobset_checks(rendered_file: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, ...]:
  """The JobSet against the schema of the fields we use (its CRD cannot be installed here), and
  each of its Job templates as a batch/v1 Job against the real Kubernetes schemas."""
  docs = [d for d in yaml.safe_load_all(rendered_file.read_text()) if d]
  jobsets = [d for d in docs if d["kind"] == "JobSet"]
  assert jobsets, f"{rendered_file.name}: no JobSet"
  (tmp_path / "jobset.json").write_text(json.dumps(jobsets[0]))
  jobs = [{"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": f"{js['metadata']['name']}-{rj['name']}"},
           "spec": rj["template"]["spec"]} for js in jobsets for rj in js["spec"]["replicatedJobs"]]
  (tmp_path / "jobs.yaml").write_text(yaml.safe_dump_all(jobs))
  return (run(tool("check-jsonschema"), "--schemafile", str(JOBSET_SCHEMA),
              str(tmp_path / "jobset.json")),
          run(tool("kubernetes-validate"), "--strict", "--quiet", str(tmp_path / "jobs.yaml")))


def test_multihost_jobset_is_valid_and_wires_jax_distributed(rendered, tmp_path):
  from jaxclf.train.distributed import Settings
  f = rendered["overlays-train-multihost"]
  for r in jobset_checks(f, tmp_path):
    assert r.returncode == 0, r.stdout + r.stderr
  docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
  by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
  js = by[("JobSet", "jaxclf-train-multihost")]
  [rj] = js["spec"]["replicatedJobs"]
  job, pod = rj["template"]["spec"], rj["template"]["spec"]["template"]["spec"]
  env = {e["name"]: e for e in pod["containers"][0]["env"]}
  # Every JAXCLF_DISTRIBUTED__X is a distributed setting; the process count agrees everywhere.
  fields = {f.name for f in __import__("dataclasses").fields(Settings)}
  for name in env:
    assert name.split("__", 1)[1].lower() in fields, name
  n = int(env["JAXCLF_DISTRIBUTED__NUM_PROCESSES"]["value"])
  # ... and a config key (jaxclf/config/defaults.py): the trainer reads them as overrides.
  from jaxclf.config import load_config
  cfg = load_config(str(REPO / "configs" / "cnn.py"),
                    environ={k: e["value"] for k, e in env.items() if "value" in e})
  assert cfg.distributed.num_processes == n and cfg.distributed.coordinator == \
      env["JAXCLF_DISTRIBUTED__COORDINATOR"]["value"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == n
  assert env["JAXCLF_DISTRIBUTED__PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
      "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  # Pod 0's stable name under the JobSet's headless Service hosts the coordinator.
  host, port = env["JAXCLF_DISTRIBUTED__COORDINATOR"]["value"].rsplit(":", 1)
  name, sub = js["metadata"]["name"], js["spec"]["network"]["subdomain"]
  assert js["spec"]["network"]["enableDNSHostnames"] is True
  assert host == f"{name}-{rj['name']}-0-0.{sub}"
  assert {"containerPort": int(port), "name": "coordinator"} in pod["containers"][0]["ports"]
  assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
  # What the pods mount and read exists, and the volume can be shared across nodes.
  claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
  assert by[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
  cm = pod["containers"][0]["envFrom"][0]["configMapRef"]["name"]
  assert ("ConfigMap", cm) in by, f"{cm} is not rendered (kustomize does not rename inside a JobSet)"


@pytest.mark.parametrize("old,new", [("maxRestarts: 3", "maxRestart: 3"),
                                     ("operator: All", "operator: Every")])
def test_jobset_schema_check_catches_a_broken_jobset(k8s_copy, tmp_path, old, new):
  js = k8s_copy / "overlays" / "train-multihost" / "jobset.yaml"
  js.write_text(js.read_text().replace(old, new, 1))
  out = tmp_path / "multihost.yaml"
  out.write_text(render(k8s_copy / "overlays" / "train-multihost"))
  schema, _ = jobset_checks(out, tmp_path)
  assert schema.returncode != 0, schema.stdout


# ----------------------------------------------------------------------------- workflows

def test_workflows_pass_actionlint():
  r = run(tool("actionlint"), "-no-color", cwd=REPO)
  assert r.returncode == 0, r.stdout + r.stderr
  names = {p.name for p in (REPO / ".github/workflows").glob("*.yml")}
  assert {"ci.yml", "retrain.yml", "release.yml", "deploy.yml", "rollback.yml"} <= names
  retrain = (REPO / ".github/workflows/retrain.yml").read_text()
  assert "jaxclf registry gate" in retrain and "dataset-changed" in retrain
  assert "jaxclf registry rollback" in (REPO / ".github/workflows/rollback.yml").read_text()


def test_actionlint_catches_a_broken_workflow(tmp_path):
  wf = tmp_path / ".github" / "workflows"
  wf.mkdir(parents=True)
  (wf / "bad.yml").write_text(
      "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    needs: missing-job\n"
      "    steps:\n      - run: echo ${{ github.nope.x }}\n      - uses: actions/checkout@v5\n"
      "        with: {no-such-input: 1}\n")
  r = run(tool("actionlint"), "-no-color", str(wf / "bad.yml"), cwd=tmp_path)
  assert r.returncode != 0
  assert "missing-job" in r.stdout and "no-such-input" in r.stdout, r.stdout
