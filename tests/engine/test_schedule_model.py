"""A model of the scheduler and block pool: random arrivals, steps, finishes and cancellations on a
tiny pool, checked after every move (hypothesis' stateful testing).

The test plays the model's part: each position the scheduler has computed is "written" into a
copy of the pool's contents, token by token, and each sequence gets a made-up next token once
its prompt is in. Invariants after every rule:
- every block's refcount equals the number of running sequences whose table holds it;
- the free list, the idle cached blocks and the held blocks split the pool, none in two parts;
- a computed block a sequence reads holds that sequence's tokens, under the name that hashes them;
- the oldest request never stalls for long;
- once every request has ended, no block is held.
Hypothesis prints the seed (and a reproduction blob) of any failure.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (make test installs it)")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from onegpu.engine.blocks import NULL_BLOCK, BlockPool, block_hashes  # noqa: E402
from onegpu.engine.schedule import Scheduler  # noqa: E402
from onegpu.engine.sequence import Sequence  # noqa: E402

SIZE = 4  # positions per block
BLOCKS = 13  # 12 usable: two full contexts and a bit
CONTEXT = 24  # positions one request may reach (prompt + new tokens): 6 blocks
# Prompts start with one of a few shared prefixes (HELM's few-shot examples), then their own.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 50, 51, 52], [70, 71, 72, 73, 74, 75, 76, 77]]
# The oldest request must advance within this many steps (preempted ones are recomputed).
PATIENCE = 40


class SchedulerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(BLOCKS, SIZE)
        self.scheduler = Scheduler(self.pool, max_batch=4, prefill_chunk=8)
        self.live: list[Sequence] = []
        self.limits: dict[int, int] = {}  # key -> length at which it finishes
        self.contents: dict[int, list[int | None]] = {}  # block -> tokens written there
        self.keys = 0
        self.stalled = 0
        self.oldest: tuple[int, int] | None = None  # (key, best progress so far)

    # -- rules ----------------------------------------------------------------------------------

    @rule(
        prefix=st.integers(0, len(PREFIXES) - 1),
        tail=st.lists(st.integers(100, 130), max_size=8),
        new=st.integers(1, 8),
        echo=st.booleans(),
    )
    def arrive(self, prefix: int, tail: list[int], new: int, echo: bool) -> None:
        ids = (PREFIXES[prefix] + tail)[: CONTEXT - new]
        self.keys += 1
        seq = Sequence(key=self.keys, ids=list(ids), prompt_len=len(ids), echo=echo)
        self.limits[seq.key] = len(ids) + new
        self.live.append(seq)
        self.scheduler.add(seq)

    @rule()
    def step(self) -> None:
        plan = self.scheduler.plan()
        for seq, count in plan.prefill:
            self._write(seq, seq.computed, count)
            self.scheduler.computed(seq, count)
            if seq.computed == seq.target and not seq.generated:
                self._next_token(seq)
        for seq in plan.decode:
            self._write(seq, seq.computed, 1)
            self.scheduler.computed(seq, 1)
            self._next_token(seq)
        self._watch_the_oldest()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self._end(seq)

    # -- the model's part -----------------------------------------------------------------------

    def _write(self, seq: Sequence, start: int, count: int) -> None:
        for position in range(start, start + count):
            block = seq.table[position // SIZE]
            slots = self.contents.setdefault(block, [None] * SIZE)
            slots[position % SIZE] = seq.ids[position]

    def _next_token(self, seq: Sequence) -> None:
        seq.ids.append(200 + sum(seq.ids) % 17)
        if len(seq.ids) >= self.limits[seq.key]:
            self._end(seq)

    def _end(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.live.remove(seq)

    def _watch_the_oldest(self) -> None:
        if not self.live:
            self.oldest, self.stalled = None, 0
            return
        first = min(self.live, key=lambda s: s.key)
        progress = len(first.ids) * 1000 + first.computed  # tokens, then positions computed
        if self.oldest is not None and first.key == self.oldest[0] and progress <= self.oldest[1]:
            self.stalled += 1  # not past its best: a recomputation after preemption counts
        else:
            self.stalled = 0
            self.oldest = (first.key, progress)
        assert self.stalled < PATIENCE, f"request {first.key} made no progress in {PATIENCE} steps"

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def refcounts_equal_the_holders(self) -> None:
        holders = [0] * BLOCKS
        for seq in self.scheduler.running:
            for block in seq.table:
                holders[block] += 1
        for seq in self.scheduler.waiting:
            assert seq.table == [], f"waiting request {seq.key} holds blocks"
        for block in range(1, BLOCKS):
            assert self.pool.refs(block) == holders[block], f"block {block}"

    @invariant()
    def free_idle_and_held_split_the_pool(self) -> None:
        free, idle = set(self.pool._free), set(self.pool._idle)
        held = {b for b in range(1, BLOCKS) if self.pool.refs(b) > 0}
        assert not free & idle and not free & held and not idle & held
        assert free | idle | held == set(range(1, BLOCKS))
        assert NULL_BLOCK not in free | idle | held
        assert len(free) == len(self.pool._free)  # no block listed twice

    @invariant()
    def cached_blocks_hold_the_tokens_their_names_hash(self) -> None:
        for seq in self.scheduler.running:
            names = block_hashes(seq.ids[: seq.computed], SIZE)
            for index, name in enumerate(names[: len(seq.table)]):
                block = seq.table[index]
                assert self.contents.get(block) == seq.ids[index * SIZE : (index + 1) * SIZE], (
                    f"request {seq.key} reads block {block} holding other tokens"
                )
                if self.pool._name.get(block) is not None and block in self.pool._computed:
                    assert self.pool._name[block] == name, f"block {block} is misnamed"

    @invariant()
    def nothing_is_held_once_every_request_ended(self) -> None:
        if not self.live:
            assert self.pool.in_use == 0
            assert not self.scheduler.running and not self.scheduler.waiting


TestSchedulerModel = SchedulerModel.TestCase
TestSchedulerModel.settings = settings(
    max_examples=500,
    stateful_step_count=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
