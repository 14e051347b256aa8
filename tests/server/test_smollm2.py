"""The real embedded model (SmolLM2-135M-Instruct from PyPI) through the engine and over HTTP."""

import pytest
from fastapi.testclient import TestClient

from onegpu.engine.types import GenerationRequest
from onegpu.server.app import create_app
from onegpu.settings import ServeSettings

pytestmark = pytest.mark.slow


def test_engine_knows_the_capital_of_france(smol_engine):
    completion = smol_engine.generate(
        GenerationRequest(prompt="The capital of France is", max_new_tokens=3, temperature=1e-7)
    )
    assert completion.tokens[0].text == " Paris"
    assert completion.text.startswith(" Paris")


def test_http_knows_the_capital_of_france(smol_engine):
    with TestClient(create_app(ServeSettings(), engine=smol_engine)) as client:
        body = client.post(
            "/process",
            json={
                "prompt": "The capital of France is",
                "temperature": 0,
                "max_new_tokens": 1,
                "top_k_per_token": 5,
            },
        ).json()
        assert body["text"] == " Paris"
        top = body["tokens"][0]["top_logprob"]
        assert max(top, key=top.get) == " Paris" and len(top) == 5
        health = client.get("/health").json()
        assert "SmolLM2" in health["model"]


def test_onegpu_serve_loads_the_embedded_default_when_no_model_is_set(monkeypatch):
    from onegpu.cli import main

    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(app=app))
    assert main(["serve", "--device", "cpu"]) == 0
    with TestClient(served["app"]) as client:
        assert client.get("/health").json()["status"] == "ready"
        body = client.post(
            "/process",
            json={"prompt": "The capital of France is", "temperature": 0, "max_new_tokens": 1},
        ).json()
        assert body["text"] == " Paris"
