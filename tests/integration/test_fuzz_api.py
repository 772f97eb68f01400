"""Fuzzing the Serve apps over real HTTP from their own OpenAPI schemas (schemathesis): whatever
a client sends, an app answers a status its schema documents for that route, with a body and
headers its schema describes, refuses what the schema says is invalid, and never answers 5xx.
The one 5xx an app gives on purpose is a 503 (documented) that says what is unavailable (a model
with no version yet, MLflow down): that is an answer, not a fault.

Not checked: that every schema-valid request is accepted (positive_data_acceptance). The schema
says what is well-formed; the platform then refuses, with a documented 4xx that names the field,
what no schema expresses (an unknown trainer parameter for that trainer, a quota, a job of another
tenant).

A member's token (team-fuzz, no jobs of anyone else's to touch): requests that would start work
are refused by validation, roles or quotas long before Ray, so the run is bounded in time.
"""

from __future__ import annotations

from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from ray_apps.cluster import serve_url

pytestmark = pytest.mark.slow
MEMBER = {"Authorization": "Bearer token-fuzz"}
EXAMPLES = 25  # per operation: ~30 operations over three apps, a minute or two here
APPS = ("/openapi.json", "/v1/agent/openapi.json", "/v1/models/openapi.json")
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


def mismatches(base: str, path: str, statuses: Counter) -> list[str]:
    """Each operation called with well-formed and malformed requests (schemathesis' positive and
    negative modes); every mismatch found, and the statuses seen in `statuses`."""
    schema = schemathesis.openapi.from_url(base + path, headers=MEMBER)
    found: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [operation.as_strategy(GenerationMode.POSITIVE)]
        if operation.body or any(True for _ in operation.iter_parameters()):  # something to malform
            modes.append(operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=st.one_of(modes))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(headers=MEMBER, timeout=30)
            statuses[response.status_code // 100 * 100] += 1
            where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]} " \
                    f"(body {str(case.body)[:200]})"
            deliberate = response.status_code == 503 and _reason(response)
            if response.status_code >= 500 and not deliberate:
                found.append(where)
            try:
                case.validate_response(response, checks=CHECKS, headers=MEMBER)
            except FailureGroup as exc:
                found.append(f"{where}\n    {str(exc).strip()[:600]}")

        call()
    return found


def _reason(response) -> str | None:
    try:
        return response.json()["detail"]["reason"]
    except (ValueError, KeyError, TypeError):
        return None


@pytest.mark.parametrize("path", APPS)
def test_every_answer_is_one_the_schema_documents_and_none_is_5xx(platform, path):
    # The agent and models ingresses start on their first request (serve_on_demand): wake the app
    # first, so that the 10 s the schema loader allows is not its start-up.
    assert requests.get(serve_url(platform) + path, headers=MEMBER, timeout=120).status_code == 200
    statuses: Counter = Counter()
    errors = mismatches(serve_url(platform), path, statuses)
    assert errors == [], f"{len(errors)} mismatches:\n" + "\n".join(errors[:20])
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # requests both served and refused
