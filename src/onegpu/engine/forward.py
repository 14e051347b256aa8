"""The model's two forward passes over the paged cache: packed prefill, and batched decode.

prefill: chunks of several prompts packed into one [1, N] batch, each with its own positions and
block table; it returns the logits each chunk asked for (its last position, every position for
echo scoring, or none for a chunk that does not end its prompt).

decode: one token for each running sequence. On the GPU it replays a CUDA graph captured for
the next batch-size bucket (1, 2, 4, 8, 16, 24, 32, ...): a step costs what is running, not what
could run. Everything a graph reads lives in fixed buffers refilled in place by one host-to-
device copy; the attention kernel's grid depends only on the bucket, so one graph serves every
sequence length. Padding rows read nothing and write to the null block.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from onegpu.engine.attention import Pass, install, prefill_tiles
from onegpu.engine.blocks import NULL_BLOCK
from onegpu.engine.invariant import make_invariant
from onegpu.engine.kvcache import PagedKVCache, slot_of

log = logging.getLogger(__name__)

Logits = Literal["none", "last", "all"]


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a decode graph is captured for: 1, 2, 4, 8, then steps of 8, up to max."""
    buckets = [b for b in (1, 2, 4) if b < max_batch]
    size = 8
    while size < max_batch:
        buckets.append(size)
        size += 8 if size < 32 else 16
    return buckets + [max_batch]


def bucket_of(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `n` rows."""
    for bucket in buckets:
        if bucket >= n:
            return bucket
    raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One sequence's share of a prefill pass: `tokens` at positions start, start + 1, ..."""

    key: int
    tokens: list[int]
    start: int
    table: list[int]
    logits: Logits = "none"


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's share of a decode pass: `token` at `position`."""

    key: int
    token: int
    position: int
    table: list[int]


class Forward:
    """Runs `model` (switched to paged attention) over `cache`."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        *,
        max_context: int,
        max_batch: int,
        graphs: bool,
        triton: bool | None = None,
        invariant: bool = False,
    ) -> None:
        if cache.num_blocks * cache.block_size < max_context + cache.block_size:
            raise ValueError(
                f"{cache.num_blocks} blocks of {cache.block_size} cannot hold one "
                f"{max_context}-token context (plus the null block)"
            )
        if invariant:  # every projection computes a row alike whatever the rows beside it
            make_invariant(model)
        install(model)
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        if triton is None:  # the kernels on CUDA, where Triton comes with torch
            triton = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
            if self.device.type == "cuda" and not triton:
                log.warning("triton is not installed: attention gathers blocks (slower)")
        self.triton = triton
        self.invariant = invariant
        self.graphs = graphs and self.device.type == "cuda"
        self.buckets = batch_buckets(max_batch)
        self.width = -(-max_context // cache.block_size)  # table columns
        rows = self.buckets[-1]
        # Decode inputs, refilled in place: [token, position, slot, length, table...] per row.
        self._staged = torch.zeros(rows, 4 + self.width, dtype=torch.int64, device=self.device)
        self._ids = torch.zeros(rows, 1, dtype=torch.int64, device=self.device)
        self._positions = torch.zeros(rows, 1, dtype=torch.int64, device=self.device)
        self._slots = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self._lengths = torch.zeros(rows, dtype=torch.int32, device=self.device)
        self._tables = torch.zeros(rows, self.width, dtype=torch.int32, device=self.device)
        # Invariant decode on Triton runs the prefill kernel, each row a chunk of one query.
        self._query_start = torch.arange(rows + 1, dtype=torch.int32, device=self.device)
        self._tiles = torch.stack(
            [self._query_start[:-1], torch.zeros_like(self._query_start[:-1])], 1
        )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    # -- prefill --------------------------------------------------------------------------------

    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """Run `chunks` in one pass; per chunk, its logits [k, V] as asked (None for "none")."""
        block = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        keep: list[int] = []
        for chunk in chunks:
            offset = len(ids)
            count = len(chunk.tokens)
            ids += chunk.tokens
            span = range(chunk.start, chunk.start + count)
            positions += span
            slots += [slot_of(chunk.table, p, block) for p in span]
            starts.append(offset + count)
            if chunk.logits == "last":
                keep.append(offset + count - 1)
            elif chunk.logits == "all":
                keep += range(offset, offset + count)
        lengths = [chunk.start + len(chunk.tokens) for chunk in chunks]
        device = self.device
        tables = torch.tensor([self._padded(c.table) for c in chunks], dtype=torch.int32)
        tiles = prefill_tiles([len(c.tokens) for c in chunks]) if self.triton else []
        batch = Pass(
            cache=self.cache,
            decode=False,
            slots=torch.tensor(slots, device=device),
            tables=tables.to(device),
            lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
            query_start=torch.tensor(starts, dtype=torch.int32, device=device),
            tiles=torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 2),
            triton=self.triton,
            invariant=self.invariant,
            host_lengths=lengths,
            host_query_start=starts,
            keys=[chunk.key for chunk in chunks],
        )
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
            onegpu_pass=batch,
        )
        logits = out.logits[0]  # [len(keep), V]
        results: list[torch.Tensor | None] = []
        taken = 0
        for chunk in chunks:
            count = {"none": 0, "last": 1, "all": len(chunk.tokens)}[chunk.logits]
            results.append(logits[taken : taken + count] if count else None)
            taken += count
        return results

    # -- decode ---------------------------------------------------------------------------------

    def decode(self, rows: list[Row]) -> torch.Tensor:
        """One token for each of `rows`; their next-token logits [len(rows), V]."""
        count = len(rows)
        size = bucket_of(count, self.buckets) if self.graphs else count
        if self.graphs and size not in self._graphs:
            self._capture(size)  # before staging: capturing runs on (and clears) the buffers
        block = self.cache.block_size
        data = [
            [
                row.token,
                row.position,
                slot_of(row.table, row.position, block),
                row.position + 1,
                *self._padded(row.table),
            ]
            for row in rows
        ]
        # Padding rows: token 0 at position 0, length 0, written to the null block.
        data += [[0, 0, NULL_BLOCK * block, 0, *self._padded([])]] * (size - count)
        host = torch.tensor(data, dtype=torch.int64)
        staged = self._staged[:size]
        staged.copy_(host, non_blocking=True)
        self._ids[:size, 0].copy_(staged[:, 0])
        self._positions[:size, 0].copy_(staged[:, 1])
        self._slots[:size].copy_(staged[:, 2])
        self._lengths[:size].copy_(staged[:, 3])
        self._tables[:size].copy_(staged[:, 4:])
        if self.graphs:
            graph, logits = self._graphs[size]
            graph.replay()
            return logits[:count]
        lengths = [row.position + 1 for row in rows]
        return self._decode_pass(size, host_lengths=lengths, keys=[row.key for row in rows])

    def _padded(self, table: list[int]) -> list[int]:
        """A block table as a row of the `width`-column table tensor (null blocks after it)."""
        return table + [NULL_BLOCK] * (self.width - len(table))

    def capture_all(self) -> None:
        """Capture the decode graph of every batch bucket now (largest first: one memory pool)."""
        if self.graphs:
            for size in reversed(self.buckets):
                if size not in self._graphs:
                    self._capture(size)

    def _decode_pass(self, size: int, *, host_lengths: list[int], keys: list[int]):
        batch = Pass(
            cache=self.cache,
            decode=True,
            slots=self._slots[:size],
            tables=self._tables[:size],
            lengths=self._lengths[:size],
            query_start=self._query_start[: size + 1],
            tiles=self._tiles[:size],
            triton=self.triton,
            invariant=self.invariant,
            host_lengths=host_lengths,
            keys=keys,
        )
        out = self.model(
            input_ids=self._ids[:size],
            position_ids=self._positions[:size],
            use_cache=False,
            logits_to_keep=1,
            onegpu_pass=batch,
        )
        return out.logits[:, -1]  # [size, V]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if not self.cache.layers:
            raise RuntimeError("capture after the first pass: the cache is allocated by it")
        # Warm-up and capture run for real on padding rows: they read nothing, write block 0.
        self._ids[:size].zero_()
        self._positions[:size].zero_()
        self._slots[:size].fill_(NULL_BLOCK * self.cache.block_size)
        self._lengths[:size].zero_()
        self._tables[:size].zero_()
        padding = {"host_lengths": [0] * size, "keys": [-1] * size}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_pass(size, **padding)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode_pass(size, **padding)
        self._graphs[size] = (graph, logits)
        log.info("captured the decode step for %d rows", size)
        return graph, logits
