"""Batches of tokenized examples: padded one per row, or packed several per row.

Every row carries `position_ids` that restart at 0 at each example, and no attention mask. From
restarting positions transformers builds a block-diagonal causal mask (sdpa and eager attention,
`masking_utils.find_packed_sequence_indices`) or variable-length kernels (flash-attention 2), so a
packed example attends only to itself, exactly as if it were alone. Padding at the end of a row is
one more "example" with its own positions and no labels, so nothing attends to it either.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from onegpu.train.format import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where nothing is learned
    position_ids: torch.Tensor  # [B, T], restarting at 0 for each example
    n_examples: int

    @property
    def n_targets(self) -> int:
        """Tokens the loss counts: labels that a previous position predicts."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.position_ids.to(device),
            self.n_examples,
        )


def pack(examples: Sequence[TokenizedExample], max_length: int) -> list[list[TokenizedExample]]:
    """Group examples, in order, into rows of at most `max_length` tokens (greedy, next-fit)."""
    rows: list[list[TokenizedExample]] = []
    used = max_length + 1
    for ex in examples:
        if len(ex) > max_length:
            raise ValueError(f"an example of {len(ex)} tokens exceeds max_length {max_length}")
        if used + len(ex) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex)
    return rows


def collate(rows: Sequence[Sequence[TokenizedExample]], *, pad_id: int) -> Batch:
    """One batch from rows of examples, padded at the end to the longest row."""
    width = max(sum(len(ex) for ex in row) for row in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        r_ids: list[int] = []
        r_labels: list[int] = []
        r_pos: list[int] = []
        for ex in row:
            r_ids += ex.input_ids
            r_labels += ex.labels
            r_pos += range(len(ex))
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE_INDEX] * pad)
        positions.append(r_pos + list(range(pad)))
    return Batch(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        n_examples=sum(len(row) for row in rows),
    )


def make_batches(
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    pad_id: int,
    seed: int | None = None,
) -> list[Batch]:
    """Batches of `batch_size` rows, in a seeded random order (`seed=None` keeps the order)."""
    order = list(examples)
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows = pack(order, max_length) if packing else [[ex] for ex in order]
    return [
        collate(rows[i : i + batch_size], pad_id=pad_id) for i in range(0, len(rows), batch_size)
    ]
