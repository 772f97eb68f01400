"""Fuzzing the Serve apps over real HTTP from their own OpenAPI schemas (schemathesis): whatever
a client sends, an app answers 4xx, never 5xx. The one 5xx an app gives on purpose is a 503 that
says what is unavailable (a model with no version yet, MLflow down): that is an answer, not a fault.

A member's token (team-fuzz, no jobs of anyone else's to touch): requests that would start work
are refused by validation, roles or quotas long before Ray, so the run is bounded in time.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ray_apps.cluster import serve_url

pytestmark = pytest.mark.slow
MEMBER = {"Authorization": "Bearer token-fuzz"}
EXAMPLES = 25  # per operation: ~30 operations over three apps, a minute or two here
APPS = ("/openapi.json", "/v1/agent/openapi.json", "/v1/models/openapi.json")


def server_errors(base: str, path: str) -> list[str]:
    schema = schemathesis.openapi.from_url(base + path, headers=MEMBER)
    found: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(headers=MEMBER, timeout=30)
            deliberate = response.status_code == 503 and _reason(response)
            if response.status_code >= 500 and not deliberate:
                found.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                             f"{response.text[:200]} (body {str(case.body)[:200]})")

        call()
    return found


def _reason(response) -> str | None:
    try:
        return response.json()["detail"]["reason"]
    except (ValueError, KeyError, TypeError):
        return None


@pytest.mark.parametrize("path", APPS)
def test_no_request_makes_an_app_answer_5xx(platform, path):
    errors = server_errors(serve_url(platform), path)
    assert errors == [], "\n".join(errors)
