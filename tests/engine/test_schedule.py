"""The scheduler's rules, step by step, on sequences that never touch a model."""

from __future__ import annotations

import pytest

from onegpu.engine.blocks import BlockPool
from onegpu.engine.schedule import Scheduler
from onegpu.engine.sequence import Sequence

SIZE = 4


def seq(key: int, ids: list[int], *, echo: bool = False) -> Sequence:
    return Sequence(key=key, ids=list(ids), prompt_len=len(ids), echo=echo)


def scheduler(blocks: int, *, max_batch: int = 8, chunk: int = 64, **kwargs) -> Scheduler:
    return Scheduler(BlockPool(blocks, SIZE), max_batch=max_batch, prefill_chunk=chunk, **kwargs)


def prefill_all(s: Scheduler) -> None:
    """Run planned prefills as if the model did, until no prompt is left (one token each)."""
    while True:
        plan = s.plan()
        if not plan.prefill:
            return
        for item, count in plan.prefill:
            s.computed(item, count)
            if item.computed == item.target and not item.generated:
                generate(item, 1000 + item.key)


def generate(item: Sequence, token: int) -> None:
    item.ids.append(token)


def decode_step(s: Scheduler) -> list[Sequence]:
    plan = s.plan()
    for item in plan.decode:
        s.computed(item, 1)
        generate(item, 2000 + item.computed)
    return plan.preempted


PROMPT = list(range(1, 14))  # 13 tokens: 3 full blocks of 4, and one more position


def test_a_prompt_takes_the_blocks_its_positions_need():
    s = scheduler(10)
    a = seq(1, PROMPT)
    s.add(a)
    plan = s.plan()
    assert plan.prefill == [(a, 13)] and len(a.table) == 4 and s.pool.in_use == 4


def test_a_repeated_prefix_is_read_from_the_cache():
    s = scheduler(20)
    a = seq(1, PROMPT)
    s.add(a)
    prefill_all(s)
    b = seq(2, PROMPT[:12] + [99, 98])
    s.add(b)
    plan = s.plan()
    # b shares a's three full blocks: only its last two positions are computed.
    assert b.table[:3] == a.table[:3] and b.computed == 12 and b.reused == 12
    assert (b, 2) in plan.prefill
    assert [s.pool.refs(block) for block in a.table[:3]] == [2, 2, 2]


def test_the_last_prompt_position_is_always_recomputed():
    s = scheduler(20)
    a = seq(1, PROMPT[:12])  # exactly three blocks
    s.add(a)
    prefill_all(s)
    b = seq(2, PROMPT[:12])
    s.add(b)
    s.plan()
    # Its first new token needs the logits of position 11: the third block is not read.
    assert b.computed == 8


def test_a_request_waits_for_a_prefix_in_flight_instead_of_computing_it_twice():
    s = scheduler(40, chunk=8)
    a, b = seq(1, PROMPT + [50]), seq(2, PROMPT + [60])
    s.add(a)
    s.add(b)
    plan = s.plan()
    assert plan.prefill == [(a, 8)] and list(s.waiting) == [b]  # b waits: a names the blocks
    s.computed(a, 8)
    plan = s.plan()
    assert list(s.waiting) == [b]  # a's third block is still being computed
    s.computed(a, 6)
    plan = s.plan()
    assert b in s.running and b.reused == 12


def test_blocks_computed_after_a_cached_prefix_are_read_by_the_next_request():
    """b reads a's first three blocks and computes two of its own; c, which starts with all
    five of b's, reads them as soon as b has computed them. (b's own blocks were never marked
    computed, so c waited for them until b finished: a summary decoded alone after the rest.)"""
    s = scheduler(40)
    a = seq(1, PROMPT[:12] + [50])
    s.add(a)
    prefill_all(s)
    b = seq(2, PROMPT[:12] + list(range(60, 69)))  # 21 tokens: 5 full blocks, 2 of them new
    s.add(b)
    prefill_all(s)
    assert b.reused == 12 and b.published == 5
    c = seq(3, b.ids[:20] + [70])
    s.add(c)
    s.plan()
    assert c in s.running and c.reused == 20 and c.table[:5] == b.table[:5]


def test_others_pass_a_waiting_request_and_memory_stops_admission_in_order():
    s = scheduler(40, chunk=8)
    a, b, c = seq(1, PROMPT + [1]), seq(2, PROMPT + [2]), seq(3, [7] * 30)
    for item in (a, b, c):
        s.add(item)
    s.plan()
    assert s.running == [a, c] and list(s.waiting) == [b]

    tight = scheduler(8)  # 7 usable blocks
    big, small = seq(1, [5] * 26), seq(2, [6] * 3)  # 7 blocks, 1 block
    tight.add(big)
    tight.add(small)
    tight.plan()
    assert tight.running == [big] and list(tight.waiting) == [small]


@pytest.mark.parametrize(
    ("chunk", "plans"),
    [
        (64, [[13, 13, 13]]),
        (20, [[13, 7], [6, 13]]),
        (13, [[13], [13], [13]]),
        (5, [[5], [5], [3, 2], [5], [5], [1, 4], [5], [4]]),
    ],
)
def test_prompts_share_a_prefill_budget_and_long_ones_are_chunked(chunk, plans):
    s = scheduler(40, chunk=chunk, prefix_cache=False)
    for key in range(3):
        s.add(seq(key, PROMPT))
    seen = []
    while True:
        plan = s.plan()
        if not plan.prefill:
            break
        seen.append([count for _, count in plan.prefill])
        for item, count in plan.prefill:
            s.computed(item, count)
            if item.computed == item.target:
                generate(item, 7)
    assert seen == plans


def test_decoding_grows_one_block_at_a_time():
    s = scheduler(10)
    a = seq(1, PROMPT[:7])
    s.add(a)
    prefill_all(s)
    assert len(a.table) == 2  # positions 0..6
    decode_step(s)  # writes position 7: still block 2
    assert len(a.table) == 2
    decode_step(s)  # writes position 8: a third block
    assert len(a.table) == 3


@pytest.mark.parametrize(
    ("elder", "younger"),
    [
        (4, 6),  # the elder is the one that finds the pool empty: the younger makes room
        (6, 4),  # the younger finds it empty: it steps back itself
    ],
)
def test_the_youngest_is_preempted_when_the_pool_runs_dry(elder, younger):
    s = scheduler(8)  # 7 usable blocks
    a, b = seq(1, [1] * elder), seq(2, [2] * younger)
    s.add(a)
    s.add(b)
    prefill_all(s)
    assert s.running == [a, b]
    steps = 0
    while not (preempted := decode_step(s)):
        steps += 1
        assert steps < 20
    assert preempted == [b] and s.running == [a] and list(s.waiting) == [b]
    assert b.computed == 0 and b.table == [] and b.preemptions == 1
    assert s.pool.in_use == len(a.table) and a.computed // SIZE < len(a.table)


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    s = scheduler(8)
    a, b = seq(1, [1] * 4), seq(2, [2] * 6)
    s.add(a)
    s.add(b)
    prefill_all(s)
    while not decode_step(s):
        pass
    generated = b.ids[6:]
    s.remove(a)  # a finishes: b comes back
    plan = s.plan()
    assert s.running == [b]
    # It prefills everything but its last token (the next decode feeds that), most of it
    # read from the blocks it published before it was preempted.
    assert b.target == len(b.ids) - 1 and b.ids[6:] == generated
    assert b.reused == (b.target - 1) // SIZE * SIZE > 0
    assert plan.prefill == [(b, b.target - b.reused)]


def test_removing_a_sequence_gives_back_every_reference():
    s = scheduler(20)
    a = seq(1, PROMPT)
    s.add(a)
    prefill_all(s)
    b = seq(2, PROMPT + [5])
    s.add(b)
    s.plan()
    s.remove(a)
    s.remove(b)
    assert s.pool.in_use == 0 and s.running == []
    assert s.pool.cached == 3  # the computed full blocks stay for the next prompt
    waiting = seq(3, PROMPT)
    s.add(waiting)
    s.remove(waiting)  # cancelled before it started
    assert s.pool.in_use == 0 and not s.waiting


def test_echo_prompts_neither_read_nor_publish_cached_blocks():
    s = scheduler(20)
    a = seq(1, PROMPT)
    s.add(a)
    prefill_all(s)
    echo = seq(2, PROMPT, echo=True)
    s.add(echo)
    s.plan()
    assert echo.computed == 0 and echo.reused == 0
    assert set(echo.table).isdisjoint(a.table)
    before = s.pool.cached
    prefill_all(s)
    assert s.pool.cached == before


def test_blocks_filled_while_decoding_are_published():
    s = scheduler(20)
    a = seq(1, PROMPT[:6])
    s.add(a)
    prefill_all(s)
    for _ in range(3):
        decode_step(s)  # positions 6, 7 (block 2 full), 8
    assert len(a.names) == 2 and a.published == 2
    b = seq(2, a.ids[:8] + [42])
    s.add(b)
    s.plan()
    assert b.reused == 8 and b.table[:2] == a.table[:2]


def test_small_requests_pass_one_that_does_not_fit_but_only_so_often(monkeypatch):
    monkeypatch.setattr("onegpu.engine.schedule.MAX_OVERTAKEN", 2)
    s = scheduler(10)  # 9 usable blocks
    first = seq(1, [1] * 16)  # 4 blocks
    s.add(first)
    s.plan()
    big = seq(2, [2] * 20)  # 5 blocks + 1 for `first` to grow into: 6 > 5 left
    small = [seq(3 + i, [3 + i] * 3) for i in range(3)]  # 1 block each
    for item in (big, *small):
        s.add(item)
    s.plan()
    # Both small ones that fit started ahead of the big one, each overtaking it once.
    assert s.running == [first, small[0], small[1]] and list(s.waiting) == [big, small[2]]
    assert big.overtaken == 2
    s.remove(small[0])  # room for small[2] now, but the big one has been passed often enough
    s.plan()
    assert list(s.waiting) == [big, small[2]]
    s.remove(first)
    s.remove(small[1])
    s.plan()
    assert s.running == [big, small[2]] and not s.waiting


def test_after_an_out_of_memory_fewer_run_at_once_and_clean_finishes_give_it_back():
    from onegpu.engine.schedule import RECOVER_AFTER

    s = scheduler(40, max_batch=4)
    sequences = [seq(key, [key] * 3) for key in range(1, 7)]
    for item in sequences:
        s.add(item)
    s.plan()
    assert len(s.running) == 4
    stepped_back = s.back_off()  # four ran when it failed: three from now on
    assert s.batch_limit == 3 and stepped_back == [sequences[3]]  # the youngest
    assert s.waiting[0] is sequences[3] and sequences[3].table == [] and s.pool.in_use == 3
    assert s.back_off() == [sequences[2]] and s.batch_limit == 2
    for _ in range(RECOVER_AFTER - 1):
        s.finished()
    assert s.batch_limit == 2
    s.finished()
    assert s.batch_limit == 3  # one more after a run of clean requests...
    for _ in range(10 * RECOVER_AFTER):
        s.finished()
    assert s.batch_limit == s.max_batch == 4  # ... never past --max-batch


@pytest.mark.parametrize(
    ("computed", "table", "free", "ok", "grown"),
    [
        (5, 2, 0, True, 2),  # position 5 lies in block 1, held already: nothing taken
        (7, 2, 0, True, 2),  # the last position of the last block held
        (8, 2, 3, True, 3),  # position 8 starts block 2: one more block
        (8, 2, 0, False, 2),  # none free: refused, nothing taken, nobody preempted
    ],
)
def test_extend_takes_the_next_positions_block_only_when_one_is_free(
    computed, table, free, ok, grown
):
    s = scheduler(table + free + 1)  # + the null block
    item = seq(0, list(range(computed)))
    item.table = s.pool.allocate(table)
    item.computed = computed
    assert s.extend(item) is ok
    assert len(item.table) == grown
    assert s.pool.available == free - (grown - table)
