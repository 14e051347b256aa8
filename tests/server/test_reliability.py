"""Limits, overload, GPU faults, cancellation, shutdown and metrics (issue: reliability)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from onegpu.engine.types import GenerationRequest, RequestCancelledError
from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import make_engine
from tests.engine.conftest import ScriptedLM
from tests.live import live_server


class FaultyLM(ScriptedLM):
    """A scripted model that raises `error` on its first `times` forward calls."""

    def __init__(self, tokenizer, error, times=1, delay=0.0, text=" fine thanks"):
        super().__init__(tokenizer.encode(text), len(tokenizer), eos_id=151643)
        self.error, self.times, self.delay = error, times, delay

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        if self.times > 0:
            self.times -= 1
            raise self.error
        return super().forward(*args, **kwargs)


def client_for(engine, **settings) -> TestClient:
    return TestClient(create_app(ServeSettings(**settings), engine=engine))


@pytest.fixture
def slow_engine(qwen_tokenizer):
    words = " one two three four five six seven eight nine ten" * 5
    model = FaultyLM(qwen_tokenizer, RuntimeError("unused"), times=0, delay=0.2, text=words)
    return make_engine(model, qwen_tokenizer)


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({"prompt": "x" * 200_001}, "200000 characters"),
        ({"prompt": "x", "max_new_tokens": 4097}, "4096"),
        ({"prompt": "x", "stop_sequences": ["s"] * 17}, "16 items"),
        ({"prompt": "x", "stop_sequences": ["s" * 257]}, "256 characters"),
        ({"prompt": "x", "top_k_per_token": 21}, "20"),
    ],
)
def test_each_limit_is_a_4xx_naming_it(tiny_client, body, limit):
    response = tiny_client.post("/process", json=body)
    assert response.status_code == 422
    assert limit in response.text


def test_decode_and_tokenize_limits(tiny_client):
    assert tiny_client.post("/decode", json={"tokens": [1] * 100_001}).status_code == 422
    assert tiny_client.post("/tokenize", json={"text": "x" * 1_000_001}).status_code == 422


def test_oversized_body_is_413_with_the_limit(tiny_qwen_model, qwen_tokenizer):
    engine = make_engine(tiny_qwen_model, qwen_tokenizer)
    with client_for(engine, max_body_bytes=2048) as client:
        response = client.post("/process", json={"prompt": "x" * 5000})
        assert response.status_code == 413
        assert "2048 bytes" in response.json()["detail"]
        assert (
            client.post("/process", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
        )


def test_validation_errors_do_not_echo_the_input(tiny_client):
    response = tiny_client.post("/process", json={"prompt": "x", "temperature": "SECRET-MARKER"})
    assert response.status_code == 422
    assert "SECRET-MARKER" not in response.text


def test_out_of_memory_answers_503_and_the_next_request_succeeds(qwen_tokenizer):
    model = FaultyLM(qwen_tokenizer, torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"))
    engine = make_engine(model, qwen_tokenizer)
    with client_for(engine) as client:
        first = client.post("/process", json={"prompt": "hello", "temperature": 0})
        assert first.status_code == 503
        assert "out of memory" in first.json()["detail"]
        assert first.headers["retry-after"]
        second = client.post("/process", json={"prompt": "hello", "temperature": 0})
        assert second.status_code == 200 and second.json()["text"] == " fine thanks"
        assert client.get("/health").status_code == 200
    assert engine.guard.oom_count == 1


def test_a_cuda_fault_marks_the_server_not_ready(qwen_tokenizer):
    model = FaultyLM(qwen_tokenizer, RuntimeError("CUDA error: an illegal memory access"))
    engine = make_engine(model, qwen_tokenizer)
    with client_for(engine) as client:
        assert client.post("/process", json={"prompt": "hello"}).status_code == 503
        assert client.get("/health").status_code == 503
        assert client.get("/health/live").status_code == 200
        assert client.post("/process", json={"prompt": "hello"}).status_code == 503


def test_an_unexpected_engine_bug_fails_one_request_only(qwen_tokenizer):
    model = FaultyLM(qwen_tokenizer, KeyError("a bug"))
    engine = make_engine(model, qwen_tokenizer)
    with client_for(engine) as client:
        failed = client.post("/process", json={"prompt": "hello"})
        assert failed.status_code == 500
        assert "a bug" not in failed.text  # no internals on the wire
        assert (
            client.post("/process", json={"prompt": "hello", "temperature": 0}).status_code == 200
        )


def test_a_bug_before_generation_starts_fails_that_request_only(tiny_qwen_model, qwen_tokenizer):
    engine = make_engine(tiny_qwen_model, qwen_tokenizer)
    tokenize = engine.tokenize

    def fragile(text, **kwargs):
        if text == "boom":
            raise KeyError("a tokenizer bug")
        return tokenize(text, **kwargs)

    engine.tokenize = fragile
    with client_for(engine) as client:
        failed = client.post("/process", json={"prompt": "boom"})
        assert failed.status_code == 500
        assert "tokenizer bug" not in failed.text
        assert (
            client.post("/process", json={"prompt": "fine", "max_new_tokens": 2}).status_code == 200
        )
        assert client.get("/health").status_code == 200


def test_cancelled_generation_stops_between_steps(slow_engine):
    calls = 0

    def cancelled():
        nonlocal calls
        calls += 1
        return calls > 2

    with pytest.raises(RequestCancelledError):
        slow_engine.generate(
            GenerationRequest(prompt="hi", max_new_tokens=50, temperature=0, stop_sequences=("@",)),
            cancelled=cancelled,
        )


def test_full_queue_is_503_with_retry_after(slow_engine):
    body = {"prompt": "hi", "max_new_tokens": 3, "temperature": 0}
    app = create_app(ServeSettings(max_queue=1), engine=slow_engine)
    with live_server(app) as url, ThreadPoolExecutor(6) as pool, httpx.Client(timeout=60) as client:
        answers = list(pool.map(lambda _: client.post(f"{url}/process", json=body), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 503 in codes, codes
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] and "queue is full" in refused.json()["detail"]


def test_request_timeout_is_503_and_frees_the_engine(slow_engine):
    body = {"prompt": "hi", "max_new_tokens": 40, "temperature": 0, "stop_sequences": ["@"]}
    with client_for(slow_engine, request_timeout_s=0.5) as client:
        started = time.monotonic()
        response = client.post("/process", json=body)
        assert response.status_code == 503 and "request_timeout_s" in response.json()["detail"]
        # The engine dropped the request instead of finishing 40 slow steps (8 s).
        short = client.post("/process", json={**body, "max_new_tokens": 1})
        assert short.status_code == 200
        assert time.monotonic() - started < 5


def test_shutdown_answers_every_accepted_request(slow_engine):
    body = {"prompt": "hi", "max_new_tokens": 3, "temperature": 0}
    app = create_app(ServeSettings(), engine=slow_engine)
    with ThreadPoolExecutor(5) as pool, httpx.Client(timeout=60) as client:
        with live_server(app) as url:
            pending = [pool.submit(client.post, f"{url}/process", json=body) for _ in range(5)]
            time.sleep(0.5)  # all five are accepted and queued or running
        # Leaving `live_server` asked uvicorn to exit while they were in flight.
        answers = [p.result() for p in pending]
    assert [a.status_code for a in answers] == [200] * 5


def test_metrics_count_requests_and_tokens(tiny_client):
    tiny_client.post("/process", json={"prompt": "count me", "max_new_tokens": 2})
    tiny_client.post("/process", json={"prompt": "x", "top_p": 5})  # 422: not an engine outcome
    text = tiny_client.get("/metrics").text
    assert 'onegpu_requests_total{endpoint="process",outcome="ok"}' in text
    assert "onegpu_generated_tokens_total" in text
    assert "onegpu_queue_depth" in text
    assert "onegpu_time_to_first_token_seconds_count" in text
    assert "onegpu_running_requests 0.0" in text
    assert "onegpu_batch_limit 32.0" in text  # the test engine's default --max-batch
    assert "onegpu_peak_running_requests 1.0" in text
    assert "onegpu_reused_prompt_tokens" in text
    assert 'onegpu_kv_blocks{state="in_use"} 0.0' in text  # both answered: nothing held
    assert 'onegpu_kv_blocks{state="total"}' in text


def test_liveness_is_separate_from_readiness(tiny_client):
    assert tiny_client.get("/health/live").json() == {"status": "alive"}
    assert tiny_client.get("/health").json()["status"] == "ready"


def test_concurrent_requests_with_faults_never_mix_outputs(qwen_tokenizer):
    model = FaultyLM(qwen_tokenizer, torch.cuda.OutOfMemoryError("injected"), times=3)
    engine = make_engine(model, qwen_tokenizer)
    lock = threading.Lock()
    with client_for(engine) as client:

        def post(i):
            with lock:
                return client.post("/process", json={"prompt": f"q{i}", "temperature": 0})

        answers = [post(i) for i in range(8)]
    codes = [a.status_code for a in answers]
    assert codes == [503] * 3 + [200] * 5
    assert all(a.json()["text"] == " fine thanks" for a in answers[3:])
