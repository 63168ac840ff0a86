"""/openapi.json is a valid OpenAPI document, and requests generated from it (schemathesis,
bounded) never get a 5xx: every refusal is a 4xx."""

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from test_pipeline import tiny_text_run

from difusion.serve import ServeSettings, create_app
from difusion.serve.models import load_models

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]' (make install)")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    run = tiny_text_run(tmp_path_factory.mktemp("schema"), "scratch", "run")  # 16x16, fast
    return create_app(ServeSettings(queue_size=64), load_models([str(run)]))


def test_openapi_document_validates(app):
    from openapi_spec_validator import validate

    spec = app.openapi()
    validate(spec)
    paths = set(spec["paths"])
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/sdapi/v1/txt2img",
            "/sdapi/v1/img2img", "/sdapi/v1/options", "/api/generate"} <= paths  # fmt: skip


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_get_a_server_error(app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])  # no shrinking: the budget  # fmt: skip
        def check(case) -> None:
            response = case.call()
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r}: {response.text}")

        try:
            check()
        except Unsatisfiable:  # no invalid request exists for this operation (a bare GET)
            assert mode == "negative"
    assert failures == []
    assert len(calls) >= 50 and any(400 <= c < 500 for c in calls)
