"""Generation semantics on a tiny random Qwen2 with the real Qwen tokenizer, on every device."""

import gc
import math
import weakref

import pytest
import torch

from onegpu.engine.forward import collector_paused
from onegpu.engine.types import ContextWindowError, GenerationRequest
from tests.conftest import DEVICES, make_engine

PROMPT = "The quick brown fox jumps over the lazy dog. Answer:"


@pytest.fixture(params=DEVICES)
def engine(request, tiny_qwen_model, qwen_tokenizer):
    # No default cut: a random model emits blank lines at random, and these tests want length.
    return make_engine(tiny_qwen_model, qwen_tokenizer, device=request.param, default_stop=())


def greedy(**kwargs) -> GenerationRequest:
    return GenerationRequest(prompt=kwargs.pop("prompt", PROMPT), temperature=1e-7, **kwargs)


def full_forward_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log-softmax over one uncached forward pass of `ids`: [T, V]."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0]
    return torch.log_softmax(logits.float(), -1).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_bit_exact_without_prefix_reuse(device, tiny_qwen_model, qwen_tokenizer):
    engine = make_engine(
        tiny_qwen_model, qwen_tokenizer, device=device, default_stop=(), prefix_cache=False
    )
    first = engine.generate(greedy(max_new_tokens=12))
    second = engine.generate(greedy(max_new_tokens=12))
    assert first.token_ids == second.token_ids
    assert [t.logprob for t in first.tokens] == [t.logprob for t in second.tokens]
    assert first.new_tokens == 12 and first.finish_reason == "length"


def test_greedy_repeat_reuses_the_prompt_and_agrees_within_float_tolerance(engine):
    prompt = " ".join([PROMPT] * 3)
    first = engine.generate(greedy(prompt=prompt, max_new_tokens=12))
    second = engine.generate(greedy(prompt=prompt, max_new_tokens=12))
    # The repeat reads every full cached block before the prompt's last token and recomputes
    # the rest: other matmul shapes, other rounding.
    size = engine.pool.block_size
    assert engine.scheduler.reused_tokens == (len(engine.tokenize(prompt)) - 1) // size * size > 0
    assert first.token_ids == second.token_ids
    for a, b in zip(first.tokens, second.tokens, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_seed_reproduces_samples_and_different_seeds_differ(engine):
    def sample(seed):
        request = GenerationRequest(
            prompt=PROMPT, max_new_tokens=16, temperature=1.0, top_k=0, seed=seed
        )
        return engine.generate(request).token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_cached_decoding_matches_one_full_forward(engine):
    completion = engine.generate(greedy(max_new_tokens=10, top_k_per_token=3))
    prompt_ids = engine.tokenize(PROMPT)
    ids = prompt_ids + completion.token_ids
    reference = full_forward_logprobs(engine, ids)
    for step, (token, info) in enumerate(zip(completion.token_ids, completion.tokens, strict=True)):
        position = len(prompt_ids) - 1 + step
        assert math.isclose(info.logprob, float(reference[position, token]), abs_tol=2e-3)
        # Greedy picks the most likely token, so it leads its own top list.
        assert max(info.top_logprob.values()) == pytest.approx(info.logprob, abs=1e-6)
        assert len(info.top_logprob) <= 3


def test_echo_scores_token_t_with_the_logits_at_t_minus_1(engine):
    completion = engine.generate(greedy(max_new_tokens=0, echo_prompt=True, top_k_per_token=2))
    ids = engine.tokenize(PROMPT)
    reference = full_forward_logprobs(engine, ids)
    assert completion.text == PROMPT
    assert len(completion.tokens) == len(ids)
    assert completion.tokens[0].logprob == 0.0 and completion.tokens[0].top_logprob == {}
    for t in range(1, len(ids)):
        assert math.isclose(
            completion.tokens[t].logprob, float(reference[t - 1, ids[t]]), abs_tol=2e-3
        )
    assert completion.logprob == pytest.approx(sum(t.logprob for t in completion.tokens))
    assert completion.finish_reason == "prompt_only"


def test_echo_with_generation_returns_prompt_then_completion(engine):
    plain = engine.generate(greedy(max_new_tokens=5))
    echoed = engine.generate(greedy(max_new_tokens=5, echo_prompt=True))
    assert echoed.text == PROMPT + plain.text
    tail = echoed.tokens[-len(plain.tokens) :]
    assert [t.text for t in tail] == [t.text for t in plain.tokens]
    # The same positions, computed in a longer kernel launch: equal up to float rounding.
    assert [t.logprob for t in tail] == pytest.approx([t.logprob for t in plain.tokens], abs=1e-5)


def test_all_values_finite_and_text_matches_tokens(engine):
    request = GenerationRequest(
        prompt=PROMPT, max_new_tokens=20, temperature=0.7, top_p=0.9, top_k_per_token=5, seed=1
    )
    completion = engine.generate(request)
    values = [completion.logprob] + [t.logprob for t in completion.tokens]
    values += [v for t in completion.tokens for v in t.top_logprob.values()]
    assert all(math.isfinite(v) for v in values)
    assert completion.text == "".join(t.text for t in completion.tokens)
    assert completion.logprob == pytest.approx(sum(t.logprob for t in completion.tokens))


def test_prompt_plus_new_tokens_over_the_window_is_refused(tiny_qwen_model, qwen_tokenizer):
    engine = make_engine(tiny_qwen_model, qwen_tokenizer, max_context=16)
    prompt_len = len(engine.tokenize(PROMPT))
    engine.generate(greedy(max_new_tokens=16 - prompt_len))  # exactly fits
    with pytest.raises(ContextWindowError, match="exceed the context window of 16"):
        engine.generate(greedy(max_new_tokens=17 - prompt_len))


def test_empty_prompt_still_generates(engine):
    completion = engine.generate(greedy(prompt="", max_new_tokens=3))
    assert completion.new_tokens == 3 and completion.prompt_tokens == 0


@pytest.mark.parametrize(("min_new_tokens", "expected_tokens"), [(0, 0), (1, 1), (3, 3)])
def test_min_new_tokens_forbids_end_of_text(qwen_tokenizer, min_new_tokens, expected_tokens):
    """A model that always prefers end-of-text (the base-model 'Answer:' failure of 2023)."""
    model = _eos_loving_model(qwen_tokenizer)
    engine = make_engine(model, qwen_tokenizer)
    completion = engine.generate(greedy(max_new_tokens=5, min_new_tokens=min_new_tokens))
    assert completion.new_tokens == expected_tokens
    assert completion.finish_reason == "eos"
    # The reported logprob is the model's own: end-of-text took almost all the mass.
    assert all(t.logprob < -10 for t in completion.tokens)


def _eos_loving_model(tokenizer):
    from tests.engine.conftest import ScriptedLM

    second_best = tokenizer.encode(" C")[0]
    model = ScriptedLM([151643] * 8, vocab_size=len(tokenizer), eos_id=151643, margin=20.0)
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[..., second_best] = 5.0
        return out

    model.forward = forward
    return model


# -- CUDA graph capture and Python's garbage collector ---------------------------------------------


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # freed only by the collector


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_runs_before_a_capture_and_not_during_it(enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        garbage = weakref.ref(_Cycle())
        assert garbage() is not None
        with collector_paused():
            assert garbage() is None  # collected on entry
            assert not gc.isenabled()
        assert gc.isenabled() == enabled  # as it was
        with pytest.raises(ValueError), collector_paused():
            raise ValueError("a failed capture")
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_dead_engines_graphs_cannot_break_a_new_engines_capture(tiny_qwen_model, qwen_tokenizer):
    """A dead engine (a reference cycle) holds captured graphs; the collector destroying them
    during another capture ended it (cudaErrorStreamCaptureInvalidated). With the collector
    set to run at nearly every allocation, no collection may start while a graph is captured."""
    old = make_engine(tiny_qwen_model, qwen_tokenizer, device="cuda", default_stop=())
    old.generate(greedy(max_new_tokens=3))
    assert old.forward._graphs  # it captured
    del old
    during_capture = []

    def watch(phase, info):
        if phase == "start" and torch.cuda.is_current_stream_capturing():
            during_capture.append(info["generation"])

    thresholds = gc.get_threshold()
    gc.callbacks.append(watch)
    gc.set_threshold(1, 1, 1)
    try:
        new = make_engine(tiny_qwen_model, qwen_tokenizer, device="cuda", default_stop=())
        completion = new.generate(greedy(max_new_tokens=3))
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(watch)
    assert new.forward._graphs
    assert completion.new_tokens == 3
    assert during_capture == []
