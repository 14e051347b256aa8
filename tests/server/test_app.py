"""The HTTP contract, through the app and its lifespan, on a tiny Qwen2 model."""

import json
import math
import subprocess
import sys

import pytest

HELM_BODY = {
    "prompt": "Question: is this a test?\nAnswer:",
    "temperature": 1e-7,
    "num_return_sequences": 1,
    "max_new_tokens": 1,
    "top_p": 1,
    "echo_prompt": False,
    "top_k_per_token": 5,
    "stop_sequences": [],
}


def assert_finite_json(payload) -> None:
    if isinstance(payload, float):
        assert math.isfinite(payload)
    elif isinstance(payload, dict):
        for value in payload.values():
            assert_finite_json(value)
    elif isinstance(payload, list):
        for value in payload:
            assert_finite_json(value)


def test_prompt_only_body_uses_the_starter_kit_defaults(tiny_client):
    response = tiny_client.post("/process", json={"prompt": "The capital of France is "})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"text", "tokens", "logprob", "request_time"}
    assert 1 <= len(body["tokens"]) <= 50
    assert body["text"] == "".join(t["text"] for t in body["tokens"])
    for token in body["tokens"]:
        assert set(token) == {"text", "logprob", "top_logprob"}
    assert body["logprob"] == pytest.approx(sum(t["logprob"] for t in body["tokens"]))
    assert_finite_json(body)


def test_helm_multiple_choice_request(tiny_client):
    body = tiny_client.post("/process", json=HELM_BODY).json()
    assert len(body["tokens"]) == 1
    assert body["text"] != ""
    assert len(body["tokens"][0]["top_logprob"]) <= 5
    assert body["tokens"][0]["logprob"] <= 0


def test_unknown_fields_are_accepted(tiny_client):
    response = tiny_client.post("/process", json={**HELM_BODY, "model": "neurips/local", "x": 1})
    assert response.status_code == 200


def test_echo_returns_prompt_and_aligned_tokens(tiny_client):
    prompt = "Hello world, how are you?"
    body = tiny_client.post(
        "/process", json={**HELM_BODY, "prompt": prompt, "echo_prompt": True, "max_new_tokens": 0}
    ).json()
    assert body["text"] == prompt
    ids = tiny_client.post("/tokenize", json={"text": prompt}).json()["tokens"]
    assert len(body["tokens"]) == len(ids)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": None},
        {"prompt": 3},
        {"prompt": "x", "max_new_tokens": -1},
        {"prompt": "x", "max_new_tokens": "many"},
        {"prompt": "x", "temperature": -0.5},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "top_p": 1.5},
        {"prompt": "x", "top_k_per_token": 0},
        {"prompt": "x", "num_samples": 2},
        {"prompt": "x", "num_return_sequences": 3},
        {"prompt": "x", "stop_sequences": "###"},
        {"prompt": "x", "seed": 1.5},
        {"prompt": "x", "seed": 2**64},
        {"prompt": "x", "seed": -(2**63) - 1},
    ],
)
def test_bad_bodies_are_422(tiny_client, body):
    response = tiny_client.post("/process", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "edge",
    [
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"seed": 0},
        {"top_k": 2**63},
        {"top_k": 2**100},
        {"top_k": 0},
        {"top_p": 1e-300},
        {"temperature": 1e308},
        {"temperature": 5e-324},
        {"top_k_per_token": 20, "temperature": 0},
        {"max_new_tokens": 0},
    ],
)
def test_numeric_edges_are_answered(tiny_client, edge):
    body = {"prompt": "x", "max_new_tokens": 2, "temperature": 0.5, **edge}
    response = tiny_client.post("/process", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["text"] is not None


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422(tiny_client, literal):
    raw = '{"prompt": "x", "temperature": ' + literal + "}"
    response = tiny_client.post(
        "/process", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_malformed_json_is_422(tiny_client):
    response = tiny_client.post(
        "/process", content="{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_over_long_prompt_is_400_with_a_message(tiny_client):
    response = tiny_client.post("/process", json={"prompt": "word " * 300, "max_new_tokens": 5})
    assert response.status_code == 400
    assert "context window of 256" in response.json()["detail"]


def test_tokenize_truncates_and_matches_what_process_uses(tiny_client):
    text = "one two three four five six seven eight"
    full = tiny_client.post("/tokenize", json={"text": text}).json()["tokens"]
    cut = tiny_client.post("/tokenize", json={"text": text, "max_length": 3}).json()["tokens"]
    untruncated = tiny_client.post(
        "/tokenize", json={"text": text, "max_length": 3, "truncation": False}
    ).json()["tokens"]
    assert cut == full[:3] and untruncated == full and len(full) > 3
    echoed = tiny_client.post(
        "/process", json={"prompt": text, "echo_prompt": True, "max_new_tokens": 0}
    ).json()
    assert len(echoed["tokens"]) == len(full)


def test_decode_round_trips_and_skips_special_tokens(tiny_client):
    ids = tiny_client.post("/tokenize", json={"text": "Paris 🦜"}).json()["tokens"]
    assert tiny_client.post("/decode", json={"tokens": ids}).json()["text"] == "Paris 🦜"
    with_special = ids + [151643]
    assert tiny_client.post("/decode", json={"tokens": with_special}).json()["text"] == "Paris 🦜"


@pytest.mark.parametrize("ids", [[-1], [10**9], [1, 2, 151669]])
def test_decode_out_of_range_is_400(tiny_client, ids):
    response = tiny_client.post("/decode", json={"tokens": ids})
    assert response.status_code == 400
    assert "token ids must be in" in response.json()["detail"]


def test_health_reports_the_model(tiny_client):
    body = tiny_client.get("/health").json()
    assert body["status"] == "ready" and body["model"] == "tiny-qwen2"


def test_openapi_documents_the_contract(tiny_client):
    spec = tiny_client.get("/openapi.json").json()
    props = spec["components"]["schemas"]["ProcessRequest"]["properties"]
    assert {"prompt", "max_new_tokens", "temperature", "top_k", "seed", "echo_prompt"} <= set(props)
    assert spec["components"]["schemas"]["ProcessRequest"]["required"] == ["prompt"]


def test_the_server_package_never_imports_torch():
    code = "import sys, onegpu.server.app, onegpu.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_responses_are_strict_json(tiny_client):
    raw = tiny_client.post("/process", json={**HELM_BODY, "max_new_tokens": 8}).text
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-finite {c} in response"))


def test_every_answer_carries_a_request_id(tiny_client):
    mine = tiny_client.post(
        "/process", json={"prompt": "hi", "max_new_tokens": 1}, headers={"X-Request-Id": "run-7.a"}
    )
    assert mine.headers["x-request-id"] == "run-7.a"  # the caller's own, echoed
    made = tiny_client.get("/health")
    assert len(made.headers["x-request-id"]) == 32  # none sent: one is made
    unusable = tiny_client.get("/health", headers={"X-Request-Id": "a b\tc" * 30})
    assert unusable.headers["x-request-id"] != "a b\tc" * 30  # not echoed into headers and logs


def test_the_request_log_line_names_the_request_id(tiny_client, caplog):
    caplog.set_level("INFO", logger="onegpu.engine.sequence")
    tiny_client.post(
        "/process", json={"prompt": "hi", "max_new_tokens": 1}, headers={"X-Request-Id": "job-42"}
    )
    assert any("request done: id=job-42 " in r.message for r in caplog.records)


def test_health_says_the_version(tiny_client):
    from onegpu import __version__

    assert tiny_client.get("/health").json()["version"] == __version__


def test_the_readme_lists_every_metric():
    from pathlib import Path

    from onegpu.server.metrics import Metrics

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    names = {metric.name for metric in Metrics().registry.collect()}
    assert names and all(f"`{name}`" in readme for name in names), sorted(names)
