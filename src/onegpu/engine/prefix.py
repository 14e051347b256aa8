"""Prefix reuse: which cache row a new prompt goes to, and whose cached prefix it can start from.

Every row of the slot cache keeps the ids of the positions it holds, also after its request
finished (until the row is given to another). HELM's few-shot prompts repeat the same examples
across a scenario's instances, so a new prompt often starts with tokens some row already holds:
those positions are copied (or kept in place) instead of recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts share hundreds of ids, and slices compare in C.
    block = 64
    while i + block <= n and a[i : i + block] == b[i : i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a prompt goes: row `row`, with its first `reuse` positions taken from row `source`."""

    row: int
    source: int
    reuse: int


def place(
    prompt: Sequence[int],
    resident: Sequence[Sequence[int]],
    free: Sequence[int],
    *,
    min_copy: int = 16,
) -> Placement:
    """Choose a free row for `prompt` and the cached prefix it starts from.

    `resident[r]` are the ids row r holds; `free` lists the rows that may take the prompt, oldest
    first (a tie keeps the most recently used rows, and their prefixes, alive longer). At least
    the prompt's last id is always recomputed: its logits are needed. Another row's prefix (busy
    or not) is copied only when it beats the chosen row's own by `min_copy` ids.
    """
    if not free:
        raise ValueError("no free row")
    limit = max(len(prompt) - 1, 0)
    shared = [min(common_prefix(prompt, ids), limit) for ids in resident]
    row = max(free, key=lambda r: (shared[r], -free.index(r)))
    best = max(range(len(resident)), key=lambda r: shared[r])
    if shared[best] >= shared[row] + min_copy:
        return Placement(row=row, source=best, reuse=shared[best])
    return Placement(row=row, source=row, reuse=shared[row])
