"""Schema fuzzing: 1,200 generated bodies (valid and invalid) against the app's own OpenAPI, the
challenge's routes and OpenAI's.

No answer may be a 5xx, every JSON answer must be strict JSON (no NaN or Infinity), and OpenAI's
routes answer a mistake in OpenAI's error shape.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import make_engine
from tests.engine.conftest import ScriptedLM

EXAMPLES_PER_MODE = 120  # x 2 modes x 5 operations = 1,200 bodies

pytestmark = pytest.mark.slow


def _reject_constant(name: str):
    raise AssertionError(f"non-finite number {name} in a response")


def test_fuzzed_bodies_never_get_a_5xx_or_non_finite_json(qwen_tokenizer):
    model = ScriptedLM(
        qwen_tokenizer.encode(" a short answer.\n\nmore"), len(qwen_tokenizer), 151643
    )
    engine = make_engine(model, qwen_tokenizer, max_context=256)
    app = create_app(ServeSettings(), engine=engine)
    calls: Counter[str] = Counter()
    with TestClient(app):  # runs the lifespan: the engine worker is up for the fuzzer's calls
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {
            "/process", "/tokenize", "/decode", "/v1/completions", "/v1/chat/completions"
        }  # fmt: skip
        for operation in operations:
            if operation.method.upper() != "POST":
                continue
            for mode in schemathesis.GenerationMode:
                _fuzz(operation, mode, calls)
    total = sum(calls.values())
    print(f"{total} fuzzed requests: {dict(sorted(calls.items()))}")
    assert total >= 1000
    assert any(" 200" in key for key in calls) and any(" 422" in key for key in calls)


def _fuzz(operation, mode, calls: Counter[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        response = case.call()
        calls[f"{operation.path} {mode.value} {response.status_code}"] += 1
        assert response.status_code < 500, (case.body, response.text)
        if "json" in str(response.headers.get("content-type")):
            body = json.loads(response.text, parse_constant=_reject_constant)
            if operation.path.startswith("/v1/") and response.status_code >= 400:
                assert set(body.get("error", {})) == {"message", "type", "param", "code"}, (
                    response.status_code,
                    body,
                    case.body,
                )

    check()
