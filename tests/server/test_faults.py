"""Faults under load: an out-of-memory that one request causes fails that request only; a client
that leaves in the middle of a prompt's prefill leaves nothing behind; a server killed with
SIGKILL under load comes back healthy with the same answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
import torch

from onegpu.engine.types import GenerationRequest
from tests.conftest import make_engine, tiny_qwen2
from tests.engine.conftest import ScriptedLM
from tests.live import free_port
from tests.server.test_reliability import client_for

POISON = " Zanzibar"  # the one request whose passes run out of memory


class OomWithPoison(ScriptedLM):
    """Every pass holding the poisoned request runs out of GPU memory: in its prefill, or (with
    `in_decode`) only once it decodes. Any other pass answers " fine thanks"."""

    def __init__(self, tokenizer, *, in_decode: bool):
        super().__init__(tokenizer.encode(" fine thanks"), len(tokenizer), eos_id=151643)
        self.poison = tokenizer.encode(POISON)[-1]
        self.in_decode = in_decode
        self.poisoned: set[int] = set()

    def forward(self, input_ids, position_ids, onegpu_pass, logits_to_keep=0, **kwargs):
        p = onegpu_pass
        if not p.decode:
            starts, ids = p.host_query_start, input_ids[0].tolist()
            for s, key in enumerate(p.keys):
                if self.poison in ids[starts[s] : starts[s + 1]]:
                    self.poisoned.add(key)
        if self.poisoned & set(p.keys) and p.decode == self.in_decode:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return super().forward(input_ids, position_ids, p, logits_to_keep, **kwargs)


@pytest.mark.parametrize("in_decode", [False, True], ids=["prefill", "decode"])
def test_an_out_of_memory_fails_only_the_request_that_causes_it(qwen_tokenizer, in_decode):
    engine = make_engine(OomWithPoison(qwen_tokenizer, in_decode=in_decode), qwen_tokenizer)
    prompts = [f"question {i}" for i in range(9)]
    prompts.insert(4, f"question{POISON}")
    with client_for(engine) as client, ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(
            pool.map(
                lambda p: client.post("/process", json={"prompt": p, "temperature": 0}), prompts
            )
        )
    codes = {prompt: answer.status_code for prompt, answer in zip(prompts, answers, strict=True)}
    assert codes.pop(f"question{POISON}") == 503
    assert set(codes.values()) == {200}
    assert all(a.json()["text"] == " fine thanks" for a in answers if a.status_code == 200)
    assert engine.guard.oom_count >= 1 and engine.pool.in_use == 0


def test_a_request_cancelled_mid_prefill_leaves_nothing_behind(qwen_tokenizer):
    model = tiny_qwen2(vocab_size=len(qwen_tokenizer))

    def new_engine():
        return make_engine(model, qwen_tokenizer, prefill_chunk=16, block_size=4, default_stop=())

    shared = "Question: is 3 larger than 5? Answer: no. " * 8  # ~100 tokens: several chunks
    request = GenerationRequest(prompt=shared + "And 9 or 2?", max_new_tokens=6, temperature=0)
    alone = new_engine().generate(request)
    engine = new_engine()
    gone = {"now": False}
    leaving: Future = Future()
    leaving.set_running_or_notify_cancel()
    staying: Future = Future()
    staying.set_running_or_notify_cancel()
    engine.admit(
        GenerationRequest(prompt=shared + "And 1 or 8?", max_new_tokens=6, temperature=0),
        leaving,
        cancelled=lambda: gone["now"],
    )
    engine.step()  # its first chunk; its next prefix blocks are named and in flight
    engine.admit(request, staying)
    engine.step()
    assert engine.scheduler.waiting[0].output.future is staying  # waits for those blocks
    gone["now"] = True  # the client leaves between two of its prefill chunks
    while not staying.done():
        engine.step()
    assert leaving.exception() is not None and not engine.busy
    assert staying.result().token_ids == alone.token_ids
    assert engine.pool.in_use == 0


@pytest.mark.slow
def test_a_server_killed_under_load_restarts_healthy_with_the_same_answers(tmp_path):
    """`onegpu serve` (the embedded model) killed with SIGKILL while 8 clients wait."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "onegpu.cli", "serve", "--device", "cpu", "--port", str(port),
               "--host", "127.0.0.1", "--log-level", "WARNING"]  # fmt: skip
    body = {"prompt": "The capital of France is", "temperature": 0, "max_new_tokens": 24}

    def start() -> subprocess.Popen:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                time.sleep(0.5)
        server.kill()
        raise AssertionError("the server did not become ready")

    server = start()
    try:
        before = httpx.post(f"{url}/process", json=body, timeout=120).json()["text"]
        with ThreadPoolExecutor(8) as pool:
            pending = [
                pool.submit(httpx.post, f"{url}/process", json=body, timeout=120) for _ in range(8)
            ]
            time.sleep(1.0)
            os.kill(server.pid, signal.SIGKILL)
            server.wait(30)
            outcomes = [f.exception() or f.result() for f in pending]
        assert all(isinstance(o, (httpx.HTTPError, httpx.Response)) for o in outcomes)
        server = start()
        again = httpx.post(f"{url}/process", json=body, timeout=120).json()["text"]
        assert again == before
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ready"
    finally:
        server.kill()
        server.wait(30)
