"""Continuous batching: a request gets the same answer alone or sharing steps with others."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from onegpu.engine.types import EngineOverloadedError, GenerationRequest, RequestCancelledError
from tests.conftest import DEVICES, make_engine
from tests.engine.conftest import ScriptedLM

SHARED = "Question: which is larger, 3 or 5? Answer: 5.\nQuestion: which is larger, 9 or 2? Answer:"

REQUESTS = [
    GenerationRequest(prompt="The quick brown fox", max_new_tokens=9, temperature=0),
    GenerationRequest(
        prompt="A much longer prompt about the weather in Paris in the spring, and then some",
        max_new_tokens=4,
        temperature=0,
        top_k_per_token=5,
    ),
    GenerationRequest(prompt=SHARED, max_new_tokens=1, temperature=0, top_k_per_token=3),
    GenerationRequest(prompt="x", max_new_tokens=14, temperature=0, min_new_tokens=3),
    GenerationRequest(prompt=SHARED + " 9", max_new_tokens=6, temperature=0),
    GenerationRequest(prompt="Seeded", max_new_tokens=8, temperature=0.7, top_k=50, seed=3),
    GenerationRequest(prompt="Echo me please", max_new_tokens=3, temperature=0, echo_prompt=True),
]


def tiny_engine(model, tokenizer, device="cpu", **kwargs):
    return make_engine(model, tokenizer, device=device, default_stop=(), **kwargs)


def assert_same(alone, batched):
    assert batched.token_ids == alone.token_ids
    assert batched.text == alone.text
    assert batched.finish_reason == alone.finish_reason
    for a, b in zip(alone.tokens, batched.tokens, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert b.top_logprob.keys() == a.top_logprob.keys()
        for text, value in a.top_logprob.items():
            assert b.top_logprob[text] == pytest.approx(value, abs=1e-4)


def run_interleaved(engine, requests, *, join_every=2):
    """Admit one request every `join_every` steps (as arrivals do), step until all are done."""
    futures: list[Future] = []
    pending = list(requests)
    steps = 0
    while pending or any(not f.done() for f in futures):
        if pending and steps % join_every == 0 and engine.has_room:
            future: Future = Future()
            future.set_running_or_notify_cancel()
            engine.admit(pending.pop(0), future)
            futures.append(future)
        if engine.busy:
            engine.step()
        steps += 1
    return [f.result() for f in futures]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_batch", [2, 7])
def test_greedy_and_seeded_answers_are_the_same_alone_and_in_a_batch(
    device, max_batch, tiny_qwen_model, qwen_tokenizer
):
    alone_engine = tiny_engine(
        tiny_qwen_model, qwen_tokenizer, device, max_batch=1, prefix_cache=False
    )
    alone = [alone_engine.generate(r) for r in REQUESTS]
    engine = tiny_engine(tiny_qwen_model, qwen_tokenizer, device, max_batch=max_batch)
    batched = run_interleaved(engine, REQUESTS, join_every=1)
    for a, b in zip(alone, batched, strict=True):
        assert_same(a, b)
    assert engine.running == 0 and engine.has_room


def test_requests_join_and_leave_between_steps(tiny_qwen_model, qwen_tokenizer):
    engine = tiny_engine(tiny_qwen_model, qwen_tokenizer, max_batch=3)
    seen_running = []
    original_step = engine.step

    def step():
        original_step()
        seen_running.append(engine.running)

    engine.step = step
    results = run_interleaved(engine, REQUESTS * 2, join_every=3)
    assert len(results) == 2 * len(REQUESTS)
    # The batch grew and shrank: more than one request shared steps, and never more than 3.
    assert max(seen_running) == 3 == engine.peak_running and 1 in seen_running
    for a, b in zip(results[: len(REQUESTS)], results[len(REQUESTS) :], strict=True):
        assert_same(a, b)


def test_a_shared_prefix_is_reused_from_a_running_row(tiny_qwen_model, qwen_tokenizer):
    plain = tiny_engine(tiny_qwen_model, qwen_tokenizer, max_batch=2, prefix_cache=False)
    first = GenerationRequest(prompt=SHARED + " 2", max_new_tokens=12, temperature=0)
    second = GenerationRequest(prompt=SHARED + " 9, surely", max_new_tokens=5, temperature=0)
    expected = [plain.generate(first), plain.generate(second)]

    engine = tiny_engine(tiny_qwen_model, qwen_tokenizer, max_batch=2, block_size=4)
    results = run_interleaved(engine, [first, second], join_every=2)
    shared = len(engine.tokenize(SHARED))
    # The second prompt read the first's cached blocks while the first still ran.
    assert engine.scheduler.reused_tokens >= (shared - 1) // 4 * 4
    for a, b in zip(expected, results, strict=True):
        assert_same(a, b)


def test_a_finished_requests_prompt_is_reused(tiny_qwen_model, qwen_tokenizer):
    engine = tiny_engine(tiny_qwen_model, qwen_tokenizer, max_batch=2, block_size=4)
    engine.generate(GenerationRequest(prompt=SHARED + " 2", max_new_tokens=1, temperature=0))
    engine.generate(GenerationRequest(prompt=SHARED + " 7", max_new_tokens=1, temperature=0))
    assert engine.scheduler.reused_tokens >= len(engine.tokenize(SHARED)) // 4 * 4


def test_echo_recomputes_the_whole_prompt(tiny_qwen_model, qwen_tokenizer):
    engine = tiny_engine(tiny_qwen_model, qwen_tokenizer, max_batch=2)
    request = GenerationRequest(prompt=SHARED, max_new_tokens=0, echo_prompt=True, temperature=0)
    first = engine.generate(request)
    second = engine.generate(request)
    assert engine.scheduler.reused_tokens == 0
    assert [t.logprob for t in first.tokens] == [t.logprob for t in second.tokens]


@pytest.mark.parametrize("overlap", [False, True])
def test_cancelling_one_request_leaves_the_others_untouched(
    overlap, tiny_qwen_model, qwen_tokenizer
):
    engine = tiny_engine(tiny_qwen_model, qwen_tokenizer, max_batch=3, overlap=overlap)
    keep = GenerationRequest(prompt="The quick brown fox", max_new_tokens=12, temperature=0)
    expected = engine.generate(keep)
    drop = GenerationRequest(prompt="Cancel me", max_new_tokens=12, temperature=0)
    kept, dropped = Future(), Future()
    for future in (kept, dropped):
        future.set_running_or_notify_cancel()
    cancel = {"now": False}
    engine.admit(keep, kept)
    engine.admit(drop, dropped, cancelled=lambda: cancel["now"])
    for _ in range(4):  # the prefill, then decode steps (overlapped: one is in flight now)
        engine.step()
    assert (engine._in_flight is not None) is overlap
    cancel["now"] = True
    while not kept.done():
        engine.step()
    with pytest.raises(RequestCancelledError):
        dropped.result()
    assert_same(expected, kept.result())
    while engine.busy:
        engine.step()
    assert engine.running == 0 and engine.pool.in_use == 0


class OomOnceInBatch(ScriptedLM):
    """A scripted model whose first decode pass over a batch runs out of GPU memory."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer.encode(" one two three four"), len(tokenizer), eos_id=151643)
        self.armed = True

    def forward(self, input_ids, position_ids, onegpu_pass, logits_to_keep=0, **kwargs):
        if self.armed and onegpu_pass.decode:
            self.armed = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return super().forward(input_ids, position_ids, onegpu_pass, logits_to_keep, **kwargs)


def test_out_of_memory_in_a_batch_retries_it_with_fewer_and_nobody_fails(qwen_tokenizer):
    engine = make_engine(OomOnceInBatch(qwen_tokenizer), qwen_tokenizer, max_batch=4)
    futures = []
    for prompt in ("a", "b", "c"):
        future: Future = Future()
        future.set_running_or_notify_cancel()
        engine.admit(GenerationRequest(prompt=prompt, max_new_tokens=4, temperature=0), future)
        futures.append(future)
    while not all(future.done() for future in futures):
        engine.step()  # a prefill pass, the decode pass that fails, then the retries
    assert [future.result().text for future in futures] == [" one two three four"] * 3
    assert engine.guard.oom_count == 1
    assert engine.scheduler.batch_limit == 2  # three ran together and failed: fewer at once now
    assert engine.scheduler.preemptions == 1  # the youngest stepped back and was recomputed
    assert engine.pool.in_use == 0


class OomOnPrefill(ScriptedLM):
    """A scripted model whose first prefill runs out of GPU memory."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer.encode(" fine"), len(tokenizer), eos_id=151643)
        self.armed = True

    def forward(self, input_ids, position_ids, onegpu_pass, logits_to_keep=0, **kwargs):
        if self.armed and not onegpu_pass.decode:
            self.armed = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return super().forward(input_ids, position_ids, onegpu_pass, logits_to_keep, **kwargs)


def test_a_failed_prefill_gives_its_row_back(qwen_tokenizer):
    engine = make_engine(OomOnPrefill(qwen_tokenizer), qwen_tokenizer, max_batch=2)
    with pytest.raises(EngineOverloadedError):
        engine.generate(GenerationRequest(prompt="a", max_new_tokens=2, temperature=0))
    assert engine.pool.in_use == 0 and engine.running == 0
    assert (
        engine.generate(GenerationRequest(prompt="b", max_new_tokens=2, temperature=0)).text
        == " fine"
    )
