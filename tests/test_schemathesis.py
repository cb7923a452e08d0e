"""Property-based API testing: Schemathesis generates requests from /openapi.json of a running
server and checks that none gets a 5xx and that every response matches the documented schema.

Bounded: a fixed number of examples per operation, derandomised so a failure reproduces.
"""
from __future__ import annotations

import itertools
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from test_serving import Server, session_export

EXAMPLES_PER_OPERATION = 20  # per operation and mode


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
  export = session_export(tmp_path_factory)
  s = Server(export, tmp_path_factory.mktemp("schemathesis") / "server.log", "--no-request-log",
             env={"JAXCLF_SERVE_ADMIN_TOKEN": "schemathesis-token"})
  yield s
  s.stop()


def test_api_never_5xx_and_matches_its_schema(api_server):
  # Schemathesis' lazy pytest fixture (`schemathesis.pytest.from_fixture`) breaks on pytest 9
  # (it writes Function._nodeid), so the operations are driven with Hypothesis directly.
  schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
  operations = [result.ok() for result in schema.get_all_operations()]
  assert len(operations) >= 9
  seen: dict[str, set[int]] = {}
  for operation, mode in itertools.product(operations, GenerationMode):
    label = f"{operation.method.upper()} {operation.path}"

    # Positive (valid per schema) and negative (schema-violating) requests alike.
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case):
      response = case.call(timeout=30)
      assert response.status_code < 500, (label, response.status_code, response.text[:500])
      seen.setdefault(label, set()).add(response.status_code)
      case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                               content_type_conformance,
                                               response_schema_conformance])

    try:
      check()
    except Unsatisfiable:
      # Nothing to violate: an operation without parameters or body has no negative cases.
      assert mode == GenerationMode.NEGATIVE and not operation.body and not len(
          list(operation.iter_parameters())), label
  print(json.dumps({k: sorted(v) for k, v in seen.items()}))
  # The generated inputs did reach the model: some predictions succeeded, some were refused.
  assert 200 in seen["POST /v1/predict/json"] or 200 in seen["POST /v1/predict"], seen
  assert any(code >= 400 for code in seen["POST /v1/predict"]), seen
