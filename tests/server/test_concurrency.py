"""30 concurrent clients (HELM's -n 30) against a live server: all answered, none mixed up."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import make_engine
from tests.live import live_server

CLIENTS = 30


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_thirty_concurrent_clients_get_their_own_answers(overlap, tiny_qwen_model, qwen_tokenizer):
    engine = make_engine(tiny_qwen_model, qwen_tokenizer, default_stop=(), overlap=overlap)
    bodies = [
        {
            "prompt": f"Request number {i}: say something about {i * 7}",
            "temperature": 1e-7,
            "max_new_tokens": 6 + i % 5,
            "top_k_per_token": 1 + i % 5,
            "stop_sequences": [],
        }
        for i in range(CLIENTS)
    ]
    with live_server(create_app(ServeSettings(), engine=engine)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            alone = [client.post("/process", json=b).json() for b in bodies]
        with ThreadPoolExecutor(CLIENTS) as pool, httpx.Client(base_url=url, timeout=120) as client:
            together = list(pool.map(lambda b: client.post("/process", json=b), bodies))
    assert [r.status_code for r in together] == [200] * CLIENTS
    for single, concurrent in zip(alone, together, strict=True):
        got = concurrent.json()
        assert got["text"] == single["text"]
        assert [t["text"] for t in got["tokens"]] == [t["text"] for t in single["tokens"]]
        # Batched with others (and starting from a reused prefix), the same request runs through
        # other matmul shapes: equal within float rounding, not bit for bit.
        for a, b in zip(single["tokens"], got["tokens"], strict=True):
            assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-4)
            assert b["top_logprob"].keys() == a["top_logprob"].keys()
    # Overlapped (the GPU's default), the steps that decode alone run ahead of their recording.
    assert (engine.stats()["overlapped_steps"] > 0) is overlap
