"""Overlapped decode steps: launched from tokens still on the device, recorded while the next
runs, and giving every request exactly what steps in order give."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from onegpu.engine.config import EngineConfig, overlap_for
from onegpu.engine.forward import _Inputs
from onegpu.engine.types import GenerationRequest
from tests.conftest import DEVICES, make_engine
from tests.engine.conftest import ScriptedLM
from tests.engine.test_batching import REQUESTS, assert_same, run_interleaved
from tests.engine.test_speculate import CYCLE, bigram_engine, greedy

MIX = [
    *REQUESTS,
    GenerationRequest(
        prompt="Stop at the letter e", max_new_tokens=20, stop_sequences=("e",), seed=5
    ),
    GenerationRequest(prompt="Sampled, many", max_new_tokens=16, temperature=1.0, seed=11),
]


@pytest.mark.parametrize(
    ("overlap", "device_type", "on"),
    [(None, "cuda", True), (None, "cpu", False), (True, "cpu", True), (False, "cuda", False)],
)
def test_overlap_is_on_where_the_device_runs_beside_the_host(overlap, device_type, on):
    assert overlap_for(EngineConfig(overlap=overlap), device_type) is on


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("staged", "fed", "ids"),
    [
        ([2, 0, 7], 2, [30, 10, 7]),  # two rows fed from `chosen`, the third staged (padding)
        ([1, 1], 2, [20, 20]),  # every row fed
        ([5, 6], 0, [5, 6]),  # none fed: the staged tokens themselves
    ],
)
def test_rows_fed_from_the_device_read_their_token_and_the_rest_their_staged_one(
    device, staged, fed, ids
):
    inputs = _Inputs(rows=4, width=1, table_width=2, device=torch.device(device))
    chosen = torch.tensor([10, 20, 30], device=device)
    inputs.fill([[token, 9, 9, 10, 1, 2] for token in staged], chosen, fed=fed)
    assert inputs.ids[: len(staged), 0].tolist() == ids
    assert inputs.positions[: len(staged), 0].tolist() == [9] * len(staged)


def test_only_a_pass_of_one_position_per_row_is_fed_from_the_device():
    inputs = _Inputs(rows=2, width=3, table_width=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="one position"):
        inputs.fill([[0] * 11], torch.tensor([1]), fed=1)


def engines(model, tokenizer, device, **config):
    """The same engine twice: steps in order, and overlapped."""
    common = {"device": device, "default_stop": (), **config}
    return (
        make_engine(model, tokenizer, overlap=False, **common),
        make_engine(model, tokenizer, overlap=True, **common),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_batch", [1, 3])
def test_overlapped_steps_give_what_steps_in_order_give(
    device, max_batch, tiny_qwen_model, qwen_tokenizer
):
    in_order, overlapped = engines(tiny_qwen_model, qwen_tokenizer, device, max_batch=max_batch)
    expected = run_interleaved(in_order, MIX, join_every=3)
    got = run_interleaved(overlapped, MIX, join_every=3)
    for a, b in zip(expected, got, strict=True):
        assert_same(a, b)
    assert in_order.stats()["overlapped_steps"] == 0
    # Most decode steps overlapped (those after an arrival or before a request's end do not).
    decoded = sum(c.new_tokens for c in got)
    assert overlapped.stats()["overlapped_steps"] > decoded // (2 * max_batch)
    # The wasted rows of requests that stopped gave their blocks back with the rest.
    assert overlapped.pool.in_use == 0 and not overlapped.busy


def script_engine(tokenizer, *, overlap: bool, **config):
    script = tokenizer.encode(" one two three. four five six. seven")
    model = ScriptedLM(script, vocab_size=len(tokenizer), eos_id=151643)
    return make_engine(model, tokenizer, overlap=overlap, default_stop=(), **config)


@pytest.mark.parametrize(
    ("stop", "max_new_tokens", "text", "reason"),
    [
        ((".",), 30, " one two three", "stop"),  # a stop sequence: the row after it is wasted
        ((), 30, " one two three. four five six. seven", "eos"),  # end-of-text ends it
        ((), 4, " one two three.", "length"),  # by length: no row launched past the last token
    ],
)
def test_an_overlapped_request_ends_where_its_own_tokens_say(
    stop, max_new_tokens, text, reason, qwen_tokenizer
):
    engine = script_engine(qwen_tokenizer, overlap=True)
    request = GenerationRequest(
        prompt="Count:", max_new_tokens=max_new_tokens, temperature=0, stop_sequences=stop
    )
    completion = engine.generate(request)
    assert (completion.text, completion.finish_reason) == (text, reason)
    assert engine.stats()["overlapped_steps"] > 0
    while engine.busy:  # a wasted step in flight lands without touching the request
        engine.step()
    assert engine.pool.in_use == 0
    again = engine.generate(request)  # the engine carries nothing over from the wasted step
    assert (again.text, again.token_ids) == (completion.text, completion.token_ids)


@pytest.mark.parametrize("cycle", [CYCLE, [9707, 1879, 11, 0]])
def test_overlap_with_speculation_keeps_the_greedy_answer(qwen_tokenizer, cycle):
    """Drafts are judged in overlapped steps as in steps in order (held back, then compared
    with the tokens that come), and a step whose drafts are worth verifying lands the step in
    flight first. The tokens are those of plain decoding either way: with the model walking the
    prompt's cycle (drafts right) and another order of its tokens (wrong until it repeats)."""
    request = greedy(CYCLE * 3, max_new_tokens=40, top_k_per_token=2)
    want = bigram_engine(qwen_tokenizer, 0, cycle=cycle)[0].generate(request)
    engine, _ = bigram_engine(qwen_tokenizer, 4, cycle=cycle, speculate_always=False, overlap=True)
    got = engine.generate(request)
    assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert [t.top_logprob for t in got.tokens] == [t.top_logprob for t in want.tokens]
    stats = engine.stats()
    assert stats["overlapped_steps"] > 0 and stats["speculation_held"] > 0
    assert stats["speculation_accepted"] > 0  # drafts were verified after overlapped steps


def test_with_few_free_blocks_steps_fall_back_to_in_order(tiny_qwen_model, qwen_tokenizer):
    """A step that would need a block nobody can spare is not overlapped: the scheduler
    preempts between steps as usual, and every answer is the same."""
    config = {"max_batch": 3, "max_context": 64, "num_blocks": 7}  # 6 blocks of 16 + the null
    requests = [
        GenerationRequest(prompt=f"Request number {i} asks", max_new_tokens=30, temperature=0)
        for i in range(3)
    ]
    in_order, overlapped = engines(tiny_qwen_model, qwen_tokenizer, "cpu", **config)
    expected = run_interleaved(in_order, requests, join_every=1)
    got = run_interleaved(overlapped, requests, join_every=1)
    for a, b in zip(expected, got, strict=True):
        assert_same(a, b)
    assert overlapped.scheduler.preemptions > 0 and overlapped.stats()["overlapped_steps"] > 0


def test_a_prompt_prefilled_in_chunks_advances_while_another_request_decodes(
    tiny_qwen_model, qwen_tokenizer
):
    """Overlapped steps carry only the requests in flight, so a request still prefilling makes
    the next step run in order, with every running request: its chunks are not held back
    until the decoding one ends."""
    engine = make_engine(
        tiny_qwen_model, qwen_tokenizer, overlap=True, prefill_chunk=16, default_stop=()
    )
    decoding, prefilling = Future(), Future()
    for future in (decoding, prefilling):
        future.set_running_or_notify_cancel()
    engine.admit(GenerationRequest(prompt="Go on", max_new_tokens=60, temperature=0), decoding)
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None
    long_prompt = list(range(1000, 1100))  # 100 tokens: 7 chunks of 16
    engine.admit(
        GenerationRequest(prompt="", prompt_ids=tuple(long_prompt), max_new_tokens=1), prefilling
    )
    steps = 0
    while not prefilling.done():
        engine.step()
        steps += 1
    assert steps <= 7 + 1 and not decoding.done()
    assert prefilling.result().prompt_tokens == 100
    while engine.busy:
        engine.step()
    assert decoding.result().new_tokens == 60 and engine.stats()["overlapped_steps"] > 0
