"""A bounded schemathesis run against the reward service's own OpenAPI schema: requests generated from the schema
(valid ones and ones mutated to break it), with and without the token, each get a declared status code, content
type, headers and body; never a 5xx. 100 examples per operation and generation mode."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mtflow.reward.server import BackgroundServer, create_app
from mtflow.testing.scorers import BrightnessScorer

TOKEN = "tok-schema"
EXAMPLES = 100
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def operations():
    # (schemathesis' own pytest loader, from_fixture, does not run under pytest 9: it reads a private node id)
    app = create_app(
        BrightnessScorer(), token=TOKEN, max_wait_ms=1.0, max_body_mb=1.0, max_inflight_body_mb=8.0
    )
    with BackgroundServer(app) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        yield {op.label: op for op in (result.ok() for result in schema.get_all_operations())}, app


def test_the_schema_declares_both_operations(operations):
    assert sorted(operations[0]) == ["GET /health", "POST /v1/score"]


RUNS = [
    ("POST /v1/score", GenerationMode.POSITIVE),
    ("POST /v1/score", GenerationMode.NEGATIVE),
    ("GET /health", GenerationMode.POSITIVE),  # it takes no input, so there is nothing to mutate
]


@pytest.mark.slow
@pytest.mark.parametrize(("label", "mode"), RUNS, ids=["score-valid", "score-mutated", "health"])
@pytest.mark.parametrize("authorized", [True, False], ids=["token", "no-token"])
def test_every_answer_matches_the_schema(operations, label, mode, authorized):
    operation = operations[0][label]
    headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        statuses.append(case.call_and_validate(headers=headers, checks=CHECKS, timeout=30).status_code)

    run()
    assert statuses and max(statuses) < 500
    if label == "POST /v1/score" and mode == GenerationMode.POSITIVE and authorized:
        assert 200 in statuses  # the schema's example is a valid request, and it is scored
