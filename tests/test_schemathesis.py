"""Property-based API testing: Schemathesis reads /openapi.json of a running server and runs every
built-in check (`--checks all`) in every phase (examples, coverage, fuzzing; stateful when the
schema has links) against it: no 5xx; statuses, content types, headers and bodies as documented;
schema-valid requests accepted and schema-violating ones rejected; undeclared methods get 405 with
`Allow`; a missing credential gets 401; auth is enforced where it is declared.

One setting, not a deselection: `positive_data_acceptance` also accepts 415 and 422, the statuses
the OpenAPI declares for content its schema allows but the server cannot use: bytes that are not
an image, an admin `model_path` that holds no model, a URL this server does not fetch. No JSON
schema can say "these bytes decode as an image".

The server has an API key and an admin token, and the requests carry both, so they get past auth
to the handlers; multipart parts and JSON `b64` fields are real images (tests/schemathesis_hooks.py),
so the decode and inference path is fuzzed too; how many images reached the model is read from
the server's own counters. Bounded and reproducible: a fixed number of examples per operation,
deterministic generation. The default suite runs a few; `-m slow` runs a deep pass.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from test_serving import ADMIN_TOKEN, API_KEY, REPO, Server, session_export

AUTH = {"X-API-Key": API_KEY, "Authorization": f"Bearer {ADMIN_TOKEN}"}
CONFIG = """
[checks.positive_data_acceptance]
# The defaults, plus what the OpenAPI declares for schema-valid content the server cannot use.
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "415", "422", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
  export = session_export(tmp_path_factory)
  s = Server(export, tmp_path_factory.mktemp("schemathesis") / "server.log", "--no-request-log",
             env={"JAXCLF_SERVE_ADMIN_TOKEN": ADMIN_TOKEN, "JAXCLF_SERVE_API_KEY": API_KEY})
  yield s
  s.stop()


def run_schemathesis(server, tmp_path: Path, examples: int) -> dict[str, float]:
  """`schemathesis run --checks all` against the server; returns the request counts by
  (endpoint, status) from the server's /metrics."""
  config = tmp_path / "schemathesis.toml"
  config.write_text(CONFIG)
  cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         server.url + "/openapi.json", "--checks", "all",
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(examples),
         "--generation-deterministic", "--seed", "0", "--workers", "1",
         "--request-timeout", "30", "--no-color", "--warnings", "off",
         "--report", "ndjson", "--report-dir", str(tmp_path / "report")]
  for name, value in AUTH.items():
    cmd += ["--header", f"{name}: {value}"]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
         "SCHEMATHESIS_HOOKS": "schemathesis_hooks"}
  before = _requests_by_status(server)
  r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
  tail = (r.stdout + r.stderr)[-6000:]
  assert r.returncode == 0, tail
  assert "Tested: " in r.stdout and "Coverage" in r.stdout, tail
  after = _requests_by_status(server)
  return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def _requests_by_status(server) -> dict[str, float]:
  text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
  out = {}
  for line in text.splitlines():
    if line.startswith("jaxclf_requests_total{"):
      labels, value = line.rsplit(" ", 1)
      out[labels] = float(value)
    elif line.startswith('jaxclf_images_total{outcome="ok"}'):
      out["images_ok"] = float(line.split()[-1])
  return out


def _count(seen: dict[str, float], endpoint: str, status: int) -> float:
  return sum(v for k, v in seen.items()
             if f'endpoint="{endpoint}"' in k and f'status="{status}"' in k)


def _check_reached_the_model(seen: dict[str, float], min_images: int) -> None:
  print(json.dumps(seen, indent=0))
  # Generated images did reach the model through both multipart endpoints and the JSON one.
  assert _count(seen, "/v1/predict", 200) > 0 and _count(seen, "/v1/predict/batch", 200) > 0, seen
  assert seen.get("images_ok", 0) >= min_images, seen
  # The coverage phase sent undeclared methods (answered 405 with Allow, or the check failed).
  assert sum(v for k, v in seen.items() if 'status="405"' in k) > 0, seen
  assert any('status="4' in k for k in seen if 'endpoint="/v1/predict"' in k), seen


def test_api_never_5xx_and_matches_its_schema(api_server, tmp_path):
  seen = run_schemathesis(api_server, tmp_path, examples=5)
  _check_reached_the_model(seen, min_images=5)


@pytest.mark.slow
def test_api_never_5xx_and_matches_its_schema_deep(api_server, tmp_path):
  seen = run_schemathesis(api_server, tmp_path, examples=500)
  _check_reached_the_model(seen, min_images=300)
