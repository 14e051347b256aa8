"""The block pool: names, refcounts, the prefix cache and its eviction order."""

from __future__ import annotations

import pytest

from onegpu.engine.blocks import NULL_BLOCK, BlockPool, Match, OutOfBlocks, block_hashes


@pytest.mark.parametrize(
    ("tokens", "size", "blocks", "why"),
    [
        ([], 4, 0, "nothing to name"),
        ([1, 2, 3], 4, 0, "a partial block has no name"),
        ([1, 2, 3, 4], 4, 1, "one full block"),
        (list(range(9)), 4, 2, "the tail past the last full block is left out"),
    ],
)
def test_only_full_blocks_are_named(tokens, size, blocks, why):
    assert len(block_hashes(tokens, size)) == blocks, why


def test_a_name_covers_every_token_before_it():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)  # same second block, other first block
    c = block_hashes([1, 2, 3, 4, 5, 6, 7, 9], 4)
    assert a[0] != b[0] and a[1] != b[1]  # the chain carries the first block's difference
    assert a[0] == c[0] and a[1] != c[1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, parent=a[0])[0] != a[0]
    # Extending from a name gives what hashing the whole prefix gives.
    assert block_hashes([5, 6, 7, 8], 4, parent=a[0]) == a[1:]


def test_large_ids_are_hashed_exactly():
    assert block_hashes([2**40], 1) != block_hashes([2**40 + 1], 1)


def test_the_null_block_is_never_handed_out():
    pool = BlockPool(5, 4)
    assert pool.capacity == pool.available == 4
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]
    assert NULL_BLOCK not in pool.allocate(0)


def test_allocation_takes_all_or_nothing():
    pool = BlockPool(4, 4)
    pool.allocate(2)
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.available == 1


def test_uncached_blocks_return_to_the_free_list():
    pool = BlockPool(4, 4)
    blocks = pool.allocate(3)
    pool.release(blocks)
    assert pool.available == 3 and pool.cached == 0 and pool.in_use == 0


def test_match_reads_computed_blocks_and_stops_at_one_in_flight():
    pool = BlockPool(8, 2)
    names = block_hashes([1, 2, 3, 4, 5, 6], 2)
    blocks = pool.allocate(3)
    for block, name in zip(blocks, names, strict=True):
        assert pool.name(block, name)
    pool.computed(blocks[0])
    assert pool.match(names) == Match((blocks[0],), in_flight=True)
    pool.computed(blocks[1])
    pool.computed(blocks[2])
    assert pool.match(names) == Match(tuple(blocks), in_flight=False)
    other = block_hashes([1, 2, 9, 9], 2)
    assert pool.match(other) == Match((blocks[0],), in_flight=False)


def test_held_cached_blocks_are_shared_and_counted():
    pool = BlockPool(8, 2)
    name = block_hashes([1, 2], 2)
    (block,) = pool.allocate(1)
    pool.name(block, name[0])
    pool.computed(block)
    pool.hold([block])  # a second sequence reads it
    assert pool.refs(block) == 2
    pool.release([block])
    assert pool.refs(block) == 1 and pool.in_use == 1
    pool.release([block])
    # Nobody holds it, but it stays cached: it is available and still matches.
    assert pool.in_use == 0 and pool.available == 7 and pool.cached == 1
    assert pool.match(name).blocks == (block,)
    pool.hold([block])
    assert pool.available == 6


def test_a_released_block_in_flight_is_forgotten():
    pool = BlockPool(4, 2)
    name = block_hashes([1, 2], 2)
    (block,) = pool.allocate(1)
    pool.name(block, name[0])
    pool.release([block])  # its sequence failed before computing it
    assert pool.cached == 0 and pool.match(name) == Match((), in_flight=False)


def test_a_name_already_taken_leaves_the_second_block_private():
    pool = BlockPool(4, 2)
    name = block_hashes([1, 2], 2)[0]
    a, b = pool.allocate(2)
    assert pool.name(a, name) and not pool.name(b, name)
    pool.computed(b)  # not named: stays private
    pool.release([b])
    assert pool.cached == 1 and pool.available == 2


def test_eviction_takes_the_least_recently_used_and_a_sequence_tail_first():
    pool = BlockPool(5, 1)  # 4 usable blocks of 1 position
    first = pool.allocate(2)
    names = block_hashes([7, 8], 1)
    for block, name in zip(first, names, strict=True):
        pool.name(block, name)
        pool.computed(block)
    pool.release(first)  # [prefix, tail]: the tail goes first
    other = pool.allocate(2)  # the two never-used blocks
    assert set(other).isdisjoint(first)
    (evicted,) = pool.allocate(1)
    assert evicted == first[1] and pool.evictions == 1
    assert pool.match(names) == Match((first[0],), in_flight=False)
    (evicted,) = pool.allocate(1)
    assert evicted == first[0] and pool.cached == 0


def test_releasing_more_than_held_is_a_bug():
    pool = BlockPool(4, 2)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError, match="released more often than held"):
        pool.release([block])
