"""Paged KV memory: one pool of fixed-size blocks, shared between requests through a prefix cache.

Every request holds a block table (the ids of the blocks its positions live in, in order). A full
block is named by a hash chain over its tokens and every token before it, so two prompts that
start with the same few-shot examples name the same blocks, and the second one reads the first
one's instead of computing them again (HELM sends hundreds of instances with identical
in-context examples). Blocks are refcounted; a cached block nobody holds stays resident until an
allocation needs it, least recently used first (vLLM's automatic prefix caching works the same
way). Block 0 is never handed out: padding rows of a batched pass write there.

Nothing here touches tensors: the pool only decides which block ids hold what.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK = 0
_ROOT = b""


def block_hashes(tokens: Sequence[int], block_size: int, *, parent: bytes = _ROOT) -> list[bytes]:
    """The name of each full block of `tokens`: a hash of its ids chained to the block before.

    Equal names mean equal token prefixes (a 128-bit digest; a chance collision is negligible),
    so a block can be reused by any sequence whose tokens up to that block are the same.
    """
    names = []
    previous = parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        ids = array("q", tokens[start : start + block_size]).tobytes()
        previous = hashlib.blake2b(previous + ids, digest_size=16).digest()
        names.append(previous)
    return names


@dataclass(frozen=True, slots=True)
class Match:
    """What the cache holds of a prompt: its first `blocks` (computed), and whether the block
    after them is being computed right now by another request (`in_flight`)."""

    blocks: tuple[int, ...]
    in_flight: bool


class OutOfBlocks(RuntimeError):
    """The pool has no free or evictable block left (the caller preempts or waits)."""


class BlockPool:
    """`num_blocks` blocks of `block_size` positions; block 0 is reserved (see NULL_BLOCK)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need >= 2 blocks of >= 1 position; got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() gives the lowest id
        self._refs = [0] * num_blocks
        self._by_name: dict[bytes, int] = {}
        self._name: dict[int, bytes] = {}
        self._computed: set[int] = set()
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.evictions = 0

    # -- reading ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Blocks that sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks an allocation can get now: never used, or cached and held by nobody."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.capacity - self.available

    @property
    def cached(self) -> int:
        """Blocks whose contents are named (computed or being computed), held or not."""
        return len(self._by_name)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: blocks in all, held by sequences, cached; evictions so far."""
        return {
            "blocks_total": self.capacity,
            "blocks_in_use": self.in_use,
            "blocks_cached": self.cached,
            "block_size": self.block_size,
            "evictions": self.evictions,
        }

    def refs(self, block: int) -> int:
        return self._refs[block]

    def match(self, names: Sequence[bytes]) -> Match:
        """The longest run of computed cached blocks that starts `names`."""
        blocks = []
        for name in names:
            block = self._by_name.get(name)
            if block is None:
                return Match(tuple(blocks), in_flight=False)
            if block not in self._computed:
                return Match(tuple(blocks), in_flight=True)
            blocks.append(block)
        return Match(tuple(blocks), in_flight=False)

    # -- changing -----------------------------------------------------------------------------

    def hold(self, blocks: Sequence[int]) -> None:
        """Take one more reference on each of `blocks` (cached blocks found by `match`)."""
        for block in blocks:
            if self._refs[block] == 0:
                self._idle.pop(block, None)
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one sequence (refcount 1), evicting idle cached ones if needed.

        Raises OutOfBlocks, taking nothing, when fewer than `count` are available.
        """
        if count > self.available:
            raise OutOfBlocks(f"{count} blocks asked for, {self.available} available")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                self._forget(block)
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each of `blocks` (a sequence's table, in order).

        A block nobody holds any more stays cached if it was computed (its tail end is evicted
        first: prefixes are what other prompts share), or goes back to the free list.
        """
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than held")
            if self._refs[block]:
                continue
            if block in self._computed:
                self._idle[block] = None
            else:
                self._forget(block)
                self._free.append(block)

    def name(self, block: int, name: bytes) -> bool:
        """Announce that `block` will hold the contents `name` (computed later: `computed`).

        False, and nothing changes, when another block already has that name: this one then
        stays private to its sequence.
        """
        if name in self._by_name or block in self._name:
            return False
        self._by_name[name] = block
        self._name[block] = name
        return True

    def computed(self, block: int) -> None:
        """`block`'s contents are written: other sequences may now read it."""
        if block in self._name:
            self._computed.add(block)

    def _forget(self, block: int) -> None:
        name = self._name.pop(block, None)
        if name is not None:
            del self._by_name[name]
        self._computed.discard(block)
