"""A property-based run against the served OpenAPI schema (schemathesis): bodies, forms,
paths and queries drawn from the schema, valid and not, never get a 5xx."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 25  # per operation: 7 operations, a bounded run


def test_no_operation_answers_5xx(make_server):
    from wanx.serve.app import create_app

    # no worker: accepted jobs only queue, so drawn sizes cost nothing; the ASGI client's Host is 'testserver'
    server = make_server(allowed_hosts=("testserver",))
    app = create_app(server, ui=False, worker=False)
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/videos", "GET /v1/videos", "GET /v1/videos/{video_id}", "GET /v1/videos/{video_id}/content",
        "DELETE /v1/videos/{video_id}", "GET /v1/model"}
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call()
            statuses.setdefault(name, set()).add(response.status_code)
            assert response.status_code < 500, f"{name}: {response.status_code} {response.text[:300]}"

        run()
    # the run reached both sides of POST: accepted and refused requests
    assert 202 in statuses["POST /v1/videos"] and statuses["POST /v1/videos"] & {400, 415, 422}
