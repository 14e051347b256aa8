"""Prompt-lookup drafts and how many of them the model's own choices keep."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from onegpu.engine.blocks import block_hashes
from onegpu.engine.config import SPECULATIVE_TOKENS_CUDA, EngineConfig, speculative_tokens_for
from onegpu.engine.forward import Chunk, Row, verify_width
from onegpu.engine.speculate import (
    PRIOR,
    WEIGHT,
    WINDOW,
    Lookup,
    accepted,
    estimate,
    worth_verifying,
)
from onegpu.engine.types import GenerationRequest
from tests.conftest import DEVICES, make_engine
from tests.engine.test_batching import REQUESTS, assert_same, run_interleaved


@pytest.mark.parametrize(
    ("ids", "k", "draft"),
    [
        ([1, 2, 3, 4, 9, 1, 2, 3], 2, [4, 9]),  # the ending 1 2 3 was followed by 4 9
        ([1, 2, 3, 4, 9, 1, 2, 3], 5, [4, 9, 1, 2, 3]),  # what follows, up to the end
        ([1, 2, 3, 4, 9, 1, 2, 3], 7, [4, 9, 1, 2, 3, 4, 9]),  # then the loop goes round again
        ([5, 1, 2, 7, 1, 2, 8, 1, 2], 3, [8, 1, 2]),  # the latest occurrence wins
        ([4, 5, 6, 6], 2, [6, 6]),  # only the one-token ending occurred before, just before
        ([1, 2, 3], 4, []),  # no ending occurred before
        ([7, 7, 7, 7], 3, [7, 7, 7]),  # never the ending itself: its previous copy, repeating
        ([3, 8, 3, 8, 3], 4, [8, 3, 8, 3]),  # a period of two
        ([1, 2, 1, 2], 0, []),  # nothing asked for
        ([], 3, []),
    ],
)
def test_a_draft_continues_the_latest_earlier_occurrence_of_the_ending(ids, k, draft):
    assert Lookup().draft(ids, k) == draft


def searched(ids: list[int], k: int, longest: int, shortest: int) -> list[int]:
    """The draft by plain search: back from the end for the longest ending's latest earlier
    occurrence within WINDOW, then what follows it, the period repeated."""
    ids = ids[-WINDOW:]
    for n in range(longest, shortest - 1, -1):
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == ids[-n:]:
                return [ids[start + n + i % (len(ids) - start - n)] for i in range(k)]
    return []


@pytest.mark.parametrize(("longest", "shortest"), [(3, 1), (5, 2), (1, 1)])
@pytest.mark.parametrize("vocab", [3, 20])
def test_a_lookup_fed_as_the_text_grows_drafts_what_a_search_finds(longest, shortest, vocab):
    rng = random.Random(vocab * 100 + longest)
    ids: list[int] = []
    lookup = Lookup(longest, shortest)
    for _ in range(300):  # grown by 1 to 5 tokens at a time, as verified drafts do
        ids += [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
        k = rng.randint(0, 9)
        assert lookup.draft(ids, k) == searched(ids, k, longest, shortest)
        if k % 3 == 0:  # a step that did not advance the request drafts again from the same text
            assert lookup.draft(ids, k) == searched(ids, k, longest, shortest)


@pytest.mark.parametrize(("filler", "draft"), [(WINDOW - 3, [2]), (WINDOW - 2, [])])
def test_a_lookup_looks_back_no_further_than_the_window(filler, draft):
    """1 2, `filler` tokens that never repeat, then 1: the earlier 1 is within the last WINDOW
    tokens only while the text is at most WINDOW long."""
    ids = [1, 2, *range(10, 10 + filler), 1]
    assert Lookup().draft(ids, 1) == draft


@pytest.mark.parametrize(
    ("draft", "chosen", "kept"),
    [
        ([4, 9, 1], [4, 9, 1, 6], 3),  # all agree: k + 1 tokens come out of the pass
        ([4, 9, 1], [4, 8, 1, 6], 1),  # the first disagreement ends the run
        ([4, 9, 1], [5, 9, 1, 6], 0),  # only the model's own token
        ([], [3], 0),
    ],
)
def test_accepted_is_the_run_the_model_agrees_with(draft, chosen, kept):
    assert accepted(draft, chosen) == kept


@pytest.mark.parametrize(
    ("draft", "bucket", "width"),
    [
        (4, 1, 5),  # one row: the whole draft
        (4, 8, 5),  # 40 rows in the pass
        (4, 16, 4),  # 16 x 5 would read the weights twice: 3 drafted tokens
        (4, 32, 2),
        (8, 4, 9),
        (4, 48, 1),  # no drafts at all
        (0, 1, 1),
    ],
)
def test_a_verifying_pass_stays_within_one_read_of_the_weights(draft, bucket, width):
    assert verify_width(draft, bucket) == width


@pytest.mark.parametrize(
    ("expected", "rows", "cost", "worth"),
    [
        ([1.0], 1, 1.08, True),  # one request: a draft that may keep a token pays for 8%
        ([0.05], 1, 1.08, False),  # one whose drafts keep almost nothing does not
        ([0.0] * 9 + [4.0], 10, 1.30, True),  # one looping row pays for the 9 others' 30%
        ([0.0] * 9 + [2.0], 10, 1.30, False),
        ([0.5] * 4, 4, 1.5, True),  # exactly the break-even: 2 tokens for half of 4 rows
        ([], 4, 1.22, False),
        ([1.0], 1, 2.48, False),  # on the CPU a pass of 5 positions costs about 2.5
        ([], 3, 1.0, True),  # a free pass is always worth it
    ],
)
def test_a_step_verifies_when_its_drafts_pay_for_the_wider_pass(expected, rows, cost, worth):
    assert worth_verifying(expected, rows, cost) is worth


@pytest.mark.parametrize(
    ("kept", "after"),
    [
        ([], PRIOR),
        ([4], (1 - WEIGHT) * PRIOR + WEIGHT * 4),
        ([0, 0, 0], (1 - WEIGHT) ** 3 * PRIOR),  # keeps falling while nothing is kept
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4], (1 - WEIGHT) ** 11 * PRIOR + WEIGHT * 4),
    ],
)
def test_what_drafts_keep_is_a_running_mean_of_the_latest(kept, after):
    value = PRIOR
    for count in kept:
        value = estimate(value, count)
    assert value == pytest.approx(after)


@pytest.mark.parametrize(
    ("asked", "device_type", "drafted"),
    [
        (None, "cuda", SPECULATIVE_TOKENS_CUDA),  # unset: on where a wide pass is cheap
        (None, "cpu", 0),  # and off where it costs what it computes
        (0, "cuda", 0),
        (2, "cpu", 2),
        (7, "cuda", 7),
    ],
)
def test_speculation_is_on_by_default_on_a_gpu_only(asked, device_type, drafted):
    config = EngineConfig(speculative_tokens=asked)
    assert speculative_tokens_for(config, device_type) == drafted


def test_an_engine_on_the_cpu_drafts_nothing_unless_asked(tiny_qwen_model, qwen_tokenizer):
    assert make_engine(tiny_qwen_model, qwen_tokenizer).speculation.k == 0
    asked = make_engine(tiny_qwen_model, qwen_tokenizer, speculative_tokens=3)
    assert asked.speculation.k == 3


# -- through the engine ---------------------------------------------------------------------------

EOS = 151643


class BigramLM(torch.nn.Module):
    """Each token's logits put `margin` on the one `following` maps it to (end-of-text for the
    rest): greedy answers walk the map, so a prompt that cycles drafts what the model agrees to."""

    def __init__(self, following: dict[int, int], vocab_size: int, margin: float = 8.0):
        super().__init__()
        self.config = SimpleNamespace(eos_token_id=EOS)
        self.generation_config = SimpleNamespace(eos_token_id=EOS)
        self._anchor = torch.nn.Parameter(torch.zeros(1))
        self.table = torch.full((vocab_size,), EOS)
        for token, after in following.items():
            self.table[token] = after
        self.margin = margin
        self.passes = 0

    def set_attn_implementation(self, name: str) -> None:
        """It has no attention layers: the paged attention is never called."""

    def forward(self, input_ids, position_ids, onegpu_pass, logits_to_keep=0, **_):
        self.passes += 1
        # transformers' convention: an int keeps the last n positions (0: all), a tensor those.
        if isinstance(logits_to_keep, int):
            ids = input_ids[:, -logits_to_keep:] if logits_to_keep else input_ids
        else:
            ids = input_ids[:, logits_to_keep]
        logits = torch.zeros(*ids.shape, len(self.table))
        logits.scatter_(-1, self.table[ids].unsqueeze(-1), self.margin)
        return SimpleNamespace(logits=logits)


CYCLE = [9707, 11, 1879, 0]  # "Hello", ",", " world", "!"


def bigram_engine(tokenizer, k, margin=8.0, cycle=CYCLE, **config):
    """An engine on a BigramLM that walks `cycle`; every draft is verified unless the config
    says otherwise (these tests are about what verifying does)."""
    following = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)}
    model = BigramLM(following, vocab_size=len(tokenizer), margin=margin)
    config = {"speculate_always": True} | config
    return make_engine(model, tokenizer, speculative_tokens=k, default_stop=(), **config), model


def greedy(ids, **kwargs):
    return GenerationRequest(prompt="", prompt_ids=tuple(ids), temperature=0, **kwargs)


@pytest.mark.parametrize("k", [1, 4])
def test_a_repeating_answer_takes_several_tokens_per_pass(qwen_tokenizer, k):
    plain, plain_model = bigram_engine(qwen_tokenizer, 0)
    fast, fast_model = bigram_engine(qwen_tokenizer, k, block_size=4)
    request = greedy(CYCLE * 2, max_new_tokens=21, top_k_per_token=2)
    want, got = plain.generate(request), fast.generate(request)
    assert got.token_ids == want.token_ids == (CYCLE * 6)[:21]
    assert [t.logprob for t in got.tokens] == [t.logprob for t in want.tokens]
    assert [t.top_logprob for t in got.tokens] == [t.top_logprob for t in want.tokens]
    stats = fast.stats()
    # Every draft is right: each verifying pass yields k + 1 tokens, the first pass one.
    assert stats["speculation_accepted"] == stats["speculation_drafted"] > 0
    assert fast_model.passes == 1 + -(-20 // (k + 1))
    assert stats["speculation_steps"] == fast_model.passes - 1  # all but the prefill
    assert plain_model.passes == 21
    assert fast.pool.in_use == 0
    # The blocks it filled are cached under the names of what they hold (the last token never
    # went into the cache), so a later prompt that starts with this answer reuses them.
    names = block_hashes(list(request.prompt_ids) + got.token_ids[:-1], 4)
    assert len(fast.pool.match(names).blocks) == len(names) == 7


def test_drafts_held_back_then_verified_once_they_match(qwen_tokenizer):
    """On the CPU a pass of 5 positions costs about 2.5 plain ones (`forward.verify_cost`), more
    than a new request's drafts are expected to keep (PRIOR): its first draft is held back and
    compared with the next 4 tokens, all of which it guessed; from then on every step verifies."""
    plain, plain_model = bigram_engine(qwen_tokenizer, 0)
    gated, gated_model = bigram_engine(qwen_tokenizer, 4, speculate_always=False)
    request = greedy(CYCLE * 2, max_new_tokens=21)
    assert gated.generate(request).token_ids == plain.generate(request).token_ids
    stats = gated.stats()
    assert stats["speculation_held"] == 4  # the steps that confirmed the first draft
    # 1 prefill pass, 4 plain steps that confirm the held draft, 15 tokens 5 at a time, and
    # the last one alone (a draft never reaches past max_new_tokens).
    assert gated_model.passes == 1 + 4 + 3 + 1
    assert stats["speculation_steps"] == 3
    assert stats["speculation_accepted"] == stats["speculation_drafted"]


def test_drafts_that_keep_nothing_stop_slowing_the_batch(qwen_tokenizer):
    """The prompt walks CYCLE, the model another order of the same tokens: drafts copied from
    the prompt are wrong until the answer has repeated itself. Verified anyway (`always`), the
    wrong drafts cost a wide pass each; gated, they are held back and the answer comes out of
    plain steps until its own repeats are guessed right."""
    other = [9707, 1879, 11, 0]  # "Hello", " world", ",", "!"
    request = greedy(CYCLE * 3, max_new_tokens=24)
    want = bigram_engine(qwen_tokenizer, 0, cycle=other)[0].generate(request)
    always, _ = bigram_engine(qwen_tokenizer, 4, cycle=other)
    gated, _ = bigram_engine(qwen_tokenizer, 4, cycle=other, speculate_always=False)
    for engine in (always, gated):
        assert engine.generate(request).token_ids == want.token_ids
    verified, held = always.stats(), gated.stats()
    assert verified["speculation_held"] == 0
    wasted = verified["speculation_drafted"] - verified["speculation_accepted"]
    assert wasted > 0 and held["speculation_held"] > 0
    assert held["speculation_drafted"] - held["speculation_accepted"] < wasted
    assert held["speculation_accepted"] > 0  # it drafts again once the answer repeats


@pytest.mark.parametrize(
    ("request_kwargs", "reason", "count"),
    [
        ({"max_new_tokens": 6}, "length", 6),  # the draft is cut to what the request may take
        # a stop inside a run
        ({"max_new_tokens": 30, "stop_sequences": ("world!Hello",)}, "stop", 3),
        ({"max_new_tokens": 30, "min_new_tokens": 7}, "length", 30),  # no drafts before 7
    ],
)
def test_an_answer_ends_where_it_would_without_drafts(
    qwen_tokenizer, request_kwargs, reason, count
):
    request = greedy(CYCLE * 2, **request_kwargs)
    want = bigram_engine(qwen_tokenizer, 0)[0].generate(request)
    engine = bigram_engine(qwen_tokenizer, 4)[0]
    got = engine.generate(request)
    assert (got.token_ids, got.text, got.finish_reason) == (
        want.token_ids,
        want.text,
        want.finish_reason,
    )
    assert got.finish_reason == reason and len(got.token_ids) == count
    assert engine.pool.in_use == 0


def test_end_of_text_inside_a_verified_run_ends_the_answer(qwen_tokenizer):
    # "Hello , world" then end-of-text, then "Hello" again: the draft after it is ", world <eos>",
    # which the model agrees with up to and including the end of text.
    engine, _ = bigram_engine(qwen_tokenizer, 4)
    engine.model.table[1879] = EOS  # " world" now ends the text
    got = engine.generate(greedy([9707, 11, 1879, EOS, 9707], max_new_tokens=20))
    assert got.token_ids == [11, 1879] and got.finish_reason == "eos"
    assert engine.stats()["speculation_accepted"] >= 2
    assert engine.pool.in_use == 0


@pytest.mark.parametrize("margin", [20.0, 12.3])
def test_a_sampled_answer_is_the_one_drawn_without_drafts(qwen_tokenizer, margin):
    """Sampled at temperature 1 over the whole vocabulary: a margin of 20 gives the map's token
    all but certainly, so the draws follow the cycle and the drafts are kept; one of 12.3 gives it
    about 60%, so draws stray and drafts are dropped. Either way each token is the one plain
    decoding draws at that index, with the same logprobs."""
    request = GenerationRequest(
        prompt="",
        prompt_ids=tuple(CYCLE * 2),
        temperature=1.0,
        top_k=0,
        seed=5,
        max_new_tokens=40,
        top_k_per_token=2,
    )
    plain, plain_model = bigram_engine(qwen_tokenizer, 0, margin)
    fast, fast_model = bigram_engine(qwen_tokenizer, 4, margin, speculate_sampled=True)
    want, got = plain.generate(request), fast.generate(request)
    greedy_only, _ = bigram_engine(qwen_tokenizer, 4, margin)  # the default drafts none
    assert greedy_only.generate(request).token_ids == want.token_ids
    assert greedy_only.stats()["speculation_drafted"] == 0
    assert (got.token_ids, got.tokens, got.finish_reason) == (
        want.token_ids,
        want.tokens,
        want.finish_reason,
    )
    stats = fast.stats()
    assert stats["speculation_drafted"] > 0
    if margin > 15:
        assert stats["speculation_accepted"] == stats["speculation_drafted"]
        assert len(got.token_ids) == 40 and fast_model.passes < plain_model.passes / 2
    else:
        assert stats["speculation_accepted"] < stats["speculation_drafted"]
    assert fast.pool.in_use == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_answers_are_those_of_plain_decoding(
    tiny_qwen_model, qwen_tokenizer, deterministic, device
):
    """Greedy, seeded, echo and min-new-token requests in one interleaved batch on a real
    (random) model: drafts mostly fail here, and what comes out must not change. On CUDA the
    verifying passes replay graphs of draft + 1 positions per row."""
    config = {"max_batch": 7, "default_stop": (), "deterministic": deterministic, "device": device}
    # A deterministic engine makes its model's projections batch-invariant in place: a copy,
    # so that the session's shared model stays as the other tests expect it.
    model = copy.deepcopy(tiny_qwen_model) if deterministic else tiny_qwen_model
    shared_kinds = [type(m) for m in tiny_qwen_model.modules()]
    plain = make_engine(model, qwen_tokenizer, **config)
    want = run_interleaved(plain, REQUESTS, join_every=1)
    fast = make_engine(
        model,
        qwen_tokenizer,
        speculative_tokens=3,
        speculate_sampled=True,
        speculate_always=True,
        **config,
    )
    got = run_interleaved(fast, REQUESTS, join_every=1)
    for a, b in zip(want, got, strict=True):
        if deterministic:
            assert (b.token_ids, b.tokens, b.finish_reason) == (
                a.token_ids,
                a.tokens,
                a.finish_reason,
            )
        else:
            assert_same(a, b)
    assert fast.stats()["speculation_drafted"] > 0
    assert fast.pool.in_use == 0
    assert [type(m) for m in tiny_qwen_model.modules()] == shared_kinds  # nothing swapped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("triton", [False, True])
def test_a_wide_decode_pass_computes_each_row_as_prefill_would(
    tiny_qwen_model, qwen_tokenizer, device, triton
):
    """Rows of 3, 1 and 5 tokens in a pass 5 positions wide (the GPU's fixed width): each real
    position's logits are those a prefill of the same tokens gives; the padding positions
    change nothing. Triton on a CPU runs in its interpreter."""
    engine = make_engine(
        tiny_qwen_model,
        qwen_tokenizer,
        device=device,
        triton=triton,
        speculative_tokens=4,
        max_batch=4,
    )
    forward = engine.forward
    # Contexts end 1, 2 and 5 positions before a block's end: the padding reaches past each.
    prompts = [list(range(100, 115)), list(range(200, 230)), list(range(300, 327))]
    tables = [[1, 2], [3, 4], [5, 6]]  # block 0 is the null block
    with torch.no_grad():
        forward.prefill(
            [Chunk(i, p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]
        )
        drafts = [[7, 8, 9], [42], [1, 2, 3, 4, 5]]
        rows = [
            Row(i, d, len(p), t)
            for i, (p, d, t) in enumerate(zip(prompts, drafts, tables, strict=True))
        ]
        wide = forward._run(rows, 5)
        # The same positions again as prefill chunks (rewriting the same keys and values).
        want = forward.prefill([Chunk(r.key, r.tokens, r.position, r.table, "all") for r in rows])
    for row, got, expected in zip(rows, wide, want, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[: len(row.tokens)], expected, atol=2e-4, rtol=1e-4)
