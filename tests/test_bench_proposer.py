"""bench/proposer.py replays drafts over an answer exactly as the engine verifies them."""

from __future__ import annotations

import pytest

from tests.conftest import bench_module
from tests.engine.test_speculate import CYCLE, bigram_engine, greedy

replay = bench_module("proposer").replay


@pytest.mark.parametrize(
    ("cycle", "k", "limit"),
    [
        (CYCLE, 4, 21),  # the prompt's cycle: every draft kept, the last cut to the limit
        ([9707, 1879, 11, 0], 4, 24),  # another order: wrong drafts until the answer repeats
        ([9707, 1879, 11, 0], 2, 23),
        ([9707, 1879, 11, 0], 1, 9),
    ],
)
def test_the_replay_counts_what_the_engine_drafts_keeps_and_passes(qwen_tokenizer, cycle, k, limit):
    prompt = CYCLE * 3
    engine, model = bigram_engine(qwen_tokenizer, k, cycle=cycle)
    answer = engine.generate(greedy(prompt, max_new_tokens=limit)).token_ids
    assert len(answer) == limit
    counts = replay(prompt, answer, limit, k, longest=3, shortest=1)
    stats = engine.stats()
    assert counts == {
        "plain": model.passes - 1 - stats["speculation_steps"],
        "passes": stats["speculation_passes"],
        "drafted": stats["speculation_drafted"],
        "kept": stats["speculation_accepted"],
    }
    assert counts["passes"] > 0


@pytest.mark.parametrize(
    ("answer", "k", "counts"),
    [
        # 2, 3 and 1 come plain (no ending occurred before); after the second 1 the draft is
        # 2 3 1, of which 2 3 are kept and the pass's own token (9) ends the answer
        ([1, 2, 3, 1, 2, 3, 9], 3, {"plain": 3, "passes": 1, "drafted": 3, "kept": 2}),
        ([1, 2, 3, 1, 2, 3, 9], 1, {"plain": 3, "passes": 2, "drafted": 2, "kept": 1}),
        ([5], 3, {"plain": 0, "passes": 0, "drafted": 0, "kept": 0}),  # prefill's token only
    ],
)
def test_the_replay_of_a_short_answer(answer, k, counts):
    assert replay([7, 8], answer, 400, k, longest=3, shortest=1) == counts
