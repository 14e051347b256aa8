"""What each engine step runs: which waiting requests start, which prompts prefill how much,
which sequences decode, and who gives memory back when the pool runs dry.

The rules, in order, each step:
1. Grow: every decoding sequence gets the blocks its next positions need (its token, and any
   tokens drafted to verify with it, which are dropped first when memory is short). With no
   block left, the youngest running sequence is preempted (its blocks go back; it waits at the
   head of the queue and is recomputed later, mostly from the prefix cache), so the oldest
   always advances.
   Memory is taken lazily, one block at a time, rather than reserved for `max_new_tokens` up
   front: HELM asks for 400 tokens and stops at the first blank line after 50.
2. Admit: waiting sequences in arrival order, while the batch has room and the pool has the
   blocks for the part of the prompt that is not cached, plus one block for each running
   sequence to grow into. A sequence whose next prompt block is being computed by another
   request right now waits for it (one step or two) instead of computing it a second time.
   One that does not fit lets later, smaller ones pass (a multiple-choice request whose
   few-shot prefix is cached needs a few blocks and is done in one step), but only
   `MAX_OVERTAKEN` times: after that nobody passes it, so a long prompt is not starved.
3. Prefill: prompts still being prefilled take up to `prefill_chunk` tokens together, oldest
   first; the last one taken may get only a part (chunked prefill), the rest next step.
4. Decode: every sequence past its prompt feeds one token.
A request can always finish alone: the pool holds at least one full context (see loading).

After a GPU out-of-memory the scheduler runs fewer sequences at once (`back_off`: the youngest
step back and are recomputed later), and gives one back per run of requests that finished
cleanly (`finished`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from onegpu.engine.blocks import BlockPool, OutOfBlocks, block_hashes
from onegpu.engine.sequence import Sequence

# How many later requests may start before a waiting one that does not fit in memory.
MAX_OVERTAKEN = 32
# Requests finished without an out-of-memory before one more may run at once again.
RECOVER_AFTER = 50


@dataclass
class Plan:
    """One step's work."""

    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Waiting and running sequences over one block pool."""

    def __init__(
        self,
        pool: BlockPool,
        *,
        max_batch: int,
        prefill_chunk: int,
        prefix_cache: bool = True,
    ) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self.batch_limit = max_batch  # fewer after an out-of-memory, for a while
        self._clean = 0  # requests finished since the last out-of-memory
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.reused_tokens = 0
        self.preemptions = 0
        self.recomputed_tokens = 0  # positions computed again after a preemption

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def plan(self) -> Plan:
        plan = Plan()
        self._grow(plan)
        self._admit()
        budget = self.prefill_chunk
        for seq in self.running:
            if budget == 0:
                break
            if seq.prefilling:
                count = min(seq.target - seq.computed, budget)
                plan.prefill.append((seq, count))
                budget -= count
        plan.decode = [seq for seq in self.running if seq.decoding]
        return plan

    def stats(self) -> dict[str, int]:
        """Counters for metrics: waiting requests, the running limit, reuse and preemptions."""
        return {
            "waiting": len(self.waiting),
            "batch_limit": self.batch_limit,
            "reused_prompt_tokens": self.reused_tokens,
            "preemptions": self.preemptions,
            "recomputed_tokens": self.recomputed_tokens,
        } | self.pool.stats()

    def back_off(self) -> list[Sequence]:
        """An out-of-memory hit what is running: run one fewer than that from now on (at least
        one), the youngest stepping back to be recomputed. Those preempted."""
        self.batch_limit = max(1, min(self.batch_limit, len(self.running)) - 1)
        self._clean = 0
        preempted = []
        while len(self.running) > self.batch_limit:
            preempted.append(self.running[-1])
            self._preempt(self.running[-1])
        return preempted

    def finished(self) -> None:
        """A request finished cleanly: after RECOVER_AFTER of them, one more may run again."""
        self._clean += 1
        if self.batch_limit < self.max_batch and self._clean >= RECOVER_AFTER:
            self.batch_limit += 1
            self._clean = 0

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out (finished, failed or cancelled) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.table)
        seq.table = []

    def computed(self, seq: Sequence, count: int) -> None:
        """`count` more positions of `seq` are in the cache: publish its newly full blocks."""
        seq.computed += count
        if seq.echo or not self.prefix_cache:
            return
        size = self.pool.block_size
        full = seq.computed // size
        if full > len(seq.names):  # blocks filled by decoding: name them now
            start = len(seq.names) * size
            parent = seq.names[-1] if seq.names else b""
            for name in block_hashes(seq.ids[start : full * size], size, parent=parent):
                self.pool.name(seq.table[len(seq.names)], name)
                seq.names.append(name)
        for index in range(seq.published, full):
            self.pool.computed(seq.table[index])
        seq.published = max(seq.published, full)

    def extend(self, seq: Sequence) -> bool:
        """Make room for `seq`'s next position, for a decode step launched before the one in
        flight is recorded (`Engine`): its block, if it lacks it and one is free. False when
        none is: preempting is for `plan`, between steps."""
        if seq.computed // self.pool.block_size < len(seq.table):
            return True
        try:
            seq.table += self.pool.allocate(1)
        except OutOfBlocks:
            return False
        return True

    # -- the rules ------------------------------------------------------------------------------

    def _grow(self, plan: Plan) -> None:
        for seq in list(self.running):
            if seq not in self.running or not seq.decoding:
                continue  # preempted meanwhile, or still prefilling (its blocks are allocated)
            # The positions this decode writes: its token, and any drafted tokens after it.
            while (seq.computed + len(seq.draft)) // self.pool.block_size >= len(seq.table):
                try:
                    seq.table += self.pool.allocate(1)
                except OutOfBlocks:
                    if seq.draft:  # guesses are the first thing to give up
                        seq.draft = []
                        continue
                    victim = self.running[-1]
                    self._preempt(victim)
                    plan.preempted.append(victim)
                    if victim is seq:
                        break

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.table)
        seq.evict()
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self) -> None:
        kept: list[Sequence] = []  # still waiting, in arrival order
        blocked: list[Sequence] = []  # waiting for memory, overtaken by what starts after them
        while self.waiting and len(self.running) < self.batch_limit:
            seq = self.waiting.popleft()
            outcome = self._try_admit(seq)
            if outcome == "ok":
                for ahead in blocked:
                    ahead.overtaken += 1
                continue
            kept.append(seq)
            if outcome == "full":
                blocked.append(seq)
                if seq.overtaken >= MAX_OVERTAKEN:
                    break  # its turn: nothing behind it starts before it does
        self.waiting.extendleft(reversed(kept))

    def _try_admit(self, seq: Sequence) -> str:
        """ "ok" (admitted), "wait" (its prefix is being computed) or "full" (no memory)."""
        size = self.pool.block_size
        target = seq.target
        names: list[bytes] = []
        cached: tuple[int, ...] = ()
        if self.prefix_cache and not seq.echo:
            names = seq.names
            if len(names) != target // size:  # named once while it waits, again after eviction
                names = seq.names = block_hashes(seq.ids[:target], size)
            # At least the last position is recomputed: the first new token needs its logits.
            match = self.pool.match(names[: (target - 1) // size])
            if match.in_flight:
                return "wait"
            cached = match.blocks
        needed = -(-target // size) - len(cached)
        # Cached blocks nobody holds count as available until this sequence holds them.
        idle = sum(1 for block in cached if self.pool.refs(block) == 0)
        if self.pool.available - idle < needed + len(self.running):
            return "full"
        self.pool.hold(cached)
        seq.table = list(cached) + self.pool.allocate(needed)
        for index in range(len(cached), len(names)):
            self.pool.name(seq.table[index], names[index])  # others now wait for these
        seq.names = names
        seq.computed, seq.published = len(cached) * size, len(cached)  # positions, blocks
        if seq.preemptions:
            self.recomputed_tokens += target - seq.computed
        seq.reused = seq.computed
        self.reused_tokens += seq.computed
        seq.admitted = True
        self.running.append(seq)
        return "ok"
