"""The paged engine end to end on a tiny Qwen2: shared prefixes, chunked prefill, preemption,
echo and int8 KV give the answers each request gets alone; memory always comes back."""

from __future__ import annotations

import importlib.util
import math
from concurrent.futures import Future

import pytest
import torch

from onegpu.engine.types import GenerationRequest, RequestCancelledError
from tests.conftest import make_engine
from tests.engine.test_batching import assert_same, run_interleaved

FEW_SHOT = "".join(
    f"Question: is {a} larger than {b}? Answer: {'yes' if a > b else 'no'}.\n"
    for a, b in [(3, 5), (9, 2), (4, 4), (12, 7), (1, 8), (6, 3)]
)
QUESTIONS = [f"Question: is {a} larger than {b}? Answer:" for a, b in [(2, 9), (8, 1), (5, 5)]]


def engine_of(model, tokenizer, **kwargs):
    kwargs.setdefault("block_size", 4)
    return make_engine(model, tokenizer, default_stop=(), **kwargs)


def mixed_requests() -> list[GenerationRequest]:
    """HELM's shapes over one few-shot block: 1-token multiple choice with top-5 logprobs,
    longer greedy answers, a seeded sample."""
    requests = [
        GenerationRequest(prompt=FEW_SHOT + q, max_new_tokens=1, temperature=0, top_k_per_token=5)
        for q in QUESTIONS
    ]
    requests += [
        GenerationRequest(prompt=FEW_SHOT + QUESTIONS[0], max_new_tokens=12, temperature=0),
        GenerationRequest(
            prompt=FEW_SHOT + QUESTIONS[1], max_new_tokens=9, temperature=0.9, top_k=40, seed=5
        ),
    ]
    return requests


def alone(model, tokenizer, requests, **kwargs):
    """Each request on a fresh engine of its own: nothing shared, nothing cached."""
    return [engine_of(model, tokenizer, prefix_cache=False, **kwargs).generate(r) for r in requests]


def test_concurrent_requests_over_a_shared_prefix_equal_each_alone(tiny_qwen_model, qwen_tokenizer):
    requests = mixed_requests()
    expected = alone(tiny_qwen_model, qwen_tokenizer, requests)
    engine = engine_of(tiny_qwen_model, qwen_tokenizer, prefill_chunk=32)
    results = run_interleaved(engine, requests, join_every=1)
    for a, b in zip(expected, results, strict=True):
        assert_same(a, b)
    prefix = len(engine.tokenize(FEW_SHOT))
    # The few-shot block was computed once: every later request read at least its full blocks.
    assert engine.scheduler.reused_tokens >= (len(requests) - 1) * (prefix // 4 * 4)
    assert engine.peak_running >= 3
    assert engine.pool.in_use == 0


CHUNKED = mixed_requests() + [
    GenerationRequest(prompt=FEW_SHOT, max_new_tokens=0, echo_prompt=True, top_k_per_token=3)
]


@pytest.fixture(scope="module")
def one_shot(tiny_qwen_model, qwen_tokenizer):
    return alone(tiny_qwen_model, qwen_tokenizer, CHUNKED, prefill_chunk=4096)


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_equals_one_shot_prefill(tiny_qwen_model, qwen_tokenizer, one_shot, chunk):
    chunked = alone(tiny_qwen_model, qwen_tokenizer, CHUNKED, prefill_chunk=chunk)
    for a, b in zip(one_shot, chunked, strict=True):
        assert_same(a, b)


def test_echo_logprobs_are_exact_when_the_prompt_is_cached(tiny_qwen_model, qwen_tokenizer):
    engine = engine_of(tiny_qwen_model, qwen_tokenizer)
    prompt = FEW_SHOT + QUESTIONS[0]
    engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=3, temperature=0))
    reused = engine.scheduler.reused_tokens
    echo = GenerationRequest(prompt=prompt, max_new_tokens=2, echo_prompt=True, temperature=0)
    completion = engine.generate(echo)
    assert engine.scheduler.reused_tokens == reused  # echo recomputes its prompt, cache or not
    ids = engine.tokenize(prompt)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
    reference = torch.log_softmax(logits.float(), -1)
    assert completion.tokens[0].logprob == 0.0
    for t in range(1, len(ids)):
        assert math.isclose(
            completion.tokens[t].logprob, float(reference[t - 1, ids[t]]), abs_tol=1e-4
        )
    assert_same(alone(tiny_qwen_model, qwen_tokenizer, [echo])[0], completion)


def test_a_small_pool_preempts_and_still_answers_as_alone(tiny_qwen_model, qwen_tokenizer):
    requests = [
        GenerationRequest(prompt=FEW_SHOT + q, max_new_tokens=40, temperature=0) for q in QUESTIONS
    ]
    expected = alone(tiny_qwen_model, qwen_tokenizer, requests, max_context=160)
    # 160 positions besides the null block: one full context fits; three prompts of about 100
    # tokens, sharing their first 84, growing by 40 each, do not.
    engine = engine_of(tiny_qwen_model, qwen_tokenizer, max_context=160, num_blocks=41)
    results = run_interleaved(engine, requests, join_every=1)
    for a, b in zip(expected, results, strict=True):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
    assert engine.scheduler.preemptions > 0
    assert engine.pool.in_use == 0


def test_cancelled_and_finished_requests_hold_no_blocks(tiny_qwen_model, qwen_tokenizer):
    engine = engine_of(tiny_qwen_model, qwen_tokenizer)
    cancel = {"now": False}
    futures = []
    for i, q in enumerate(QUESTIONS):
        future: Future = Future()
        future.set_running_or_notify_cancel()
        request = GenerationRequest(prompt=FEW_SHOT + q, max_new_tokens=20, temperature=0)
        engine.admit(request, future, cancelled=(lambda: cancel["now"]) if i == 1 else None)
        futures.append(future)
    engine.step()
    engine.step()
    assert engine.pool.in_use > 0
    cancel["now"] = True
    while engine.busy:
        engine.step()
    with pytest.raises(RequestCancelledError):
        futures[1].result()
    assert futures[0].result().new_tokens == 20
    assert engine.pool.in_use == 0 and engine.running == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_engine_answers_as_the_reference_engine(tiny_qwen_model, qwen_tokenizer):
    """On the CPU the kernels run in Triton's interpreter (CUDA runs them in test_attention)."""
    if not torch.cuda.is_available():
        import os

        assert os.environ.get("TRITON_INTERPRET") == "1"
    requests = mixed_requests()[:4]
    reference = engine_of(tiny_qwen_model, qwen_tokenizer, block_size=16)
    expected = run_interleaved(reference, requests, join_every=1)
    engine = engine_of(tiny_qwen_model, qwen_tokenizer, block_size=16, triton=True)
    for a, b in zip(expected, run_interleaved(engine, requests, join_every=1), strict=True):
        assert_same(a, b)


def test_int8_kv_stays_close_to_the_models_dtype(tiny_qwen_model, qwen_tokenizer):
    requests = mixed_requests()[:4]
    plain = alone(tiny_qwen_model, qwen_tokenizer, requests)
    quantized = alone(tiny_qwen_model, qwen_tokenizer, requests, kv_cache_dtype="int8")
    worst = 0.0
    for a, b in zip(plain, quantized, strict=True):
        assert b.token_ids == a.token_ids
        pairs = zip(a.tokens, b.tokens, strict=True)
        worst = max(worst, *(abs(x.logprob - y.logprob) for x, y in pairs))
    assert worst < 0.05
    engine = engine_of(tiny_qwen_model, qwen_tokenizer, kv_cache_dtype="int8")
    engine.generate(requests[0])
    fp = engine_of(tiny_qwen_model, qwen_tokenizer)
    fp.generate(requests[0])
    # int8 codes and a float32 scale per (position, head): about half of float32's... here a
    # quarter plus the scales, since the tiny model computes in float32.
    assert engine.cache.nbytes() < fp.cache.nbytes() / 3
