"""The model's two forward passes over the paged cache: packed prefill, and batched decode.

prefill: chunks of several prompts packed into one [1, N] batch, each with its own positions and
block table; it returns the logits each chunk asked for (its last position, every position for
echo scoring, or none for a chunk that does not end its prompt).

decode: one token for each running sequence, or (`verify`) its token and the tokens drafted to
follow it, each row then `draft + 1` positions wide. On the GPU it replays a CUDA graph captured
for the next batch-size bucket (1, 2, 4, 8, 16, 24, 32, ...) and width: a step costs what is
running, not what could run. Everything a graph reads lives in fixed buffers refilled in place
by one host-to-device copy; the attention kernels' grids depend only on the bucket, so one graph
serves every sequence length. Padding rows and positions write to the null block.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from onegpu.engine.attention import Pass, install, prefill_tiles
from onegpu.engine.blocks import NULL_BLOCK
from onegpu.engine.invariant import make_invariant
from onegpu.engine.kvcache import PagedKVCache, slot_of

log = logging.getLogger(__name__)

Logits = Literal["none", "last", "all"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Collect Python's garbage now, and none until the block ends (a CUDA graph capture).

    A graph destroyed while another is being captured (an earlier engine's, freed when the
    collector breaks its reference cycles) is an illegal call that ends the capture with
    cudaErrorStreamCaptureInvalidated; `torch.cuda.graph` no longer collects first.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a decode graph is captured for: 1, 2, 4, 8, then steps of 8, up to max."""
    buckets = [b for b in (1, 2, 4) if b < max_batch]
    size = 8
    while size < max_batch:
        buckets.append(size)
        size += 8 if size < 32 else 16
    return buckets + [max_batch]


# Rows a verifying pass may hold on the GPU (batch bucket x positions per row): Marlin covers
# up to 64 rows of activations in one read of the weights. Measured on an H100 (bench/
# step_cost.py, 14B-shaped 8-bit, context 512): 16 rows x 3 positions cost 1.16x a one-position
# step, 16 x 5 cost 1.85x (two reads of every weight).
VERIFY_ROWS = 64

# What a verifying pass costs against a plain one, by batch bucket, on the GPU (H100, 14B-shaped
# 8-bit, bench/step_cost.py): 1 row x 5 positions 1.08x, 4 x 5 1.22x, 16 x 4 1.30x; 2 and 8
# rows are not measured (taken between their neighbours), past 16 rows as 16. On the CPU a pass
# costs what it computes: k = 4 at one request ran 0.74x with 1.86 tokens per verifying pass
# (Qwen2.5-0.5B, bench/speculation.py), about 2.5 plain passes per pass of 5 positions.
VERIFY_COST = {1: 1.08, 2: 1.15, 4: 1.22, 8: 1.26, 16: 1.30}
CPU_COST_PER_POSITION = 0.37


def verify_width(draft: int, bucket: int) -> int:
    """Positions per row of a verifying pass on the GPU: the draft and the row's own token, as
    long as `bucket` rows of them fit VERIFY_ROWS (1: no draft at this batch size)."""
    return max(1, min(draft + 1, VERIFY_ROWS // bucket))


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
    """One sequence's share of a decode pass: its last token at `position`, then the tokens
    drafted to follow it (`speculate`) at the positions after."""

    key: int
    tokens: list[int]
    position: int
    table: list[int]


class _Inputs:
    """The fixed device buffers a decode pass of `width` positions per row reads, refilled in
    place by one host-to-device copy (a captured graph reads them where they are)."""

    def __init__(self, rows: int, width: int, table_width: int, device: torch.device) -> None:
        self.width = width
        # Per row: [tokens (width), positions (width), slots (width), length, table...].
        self.staged = torch.zeros(
            rows, 3 * width + 1 + table_width, dtype=torch.int64, device=device
        )
        self.ids = torch.zeros(rows, width, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, width, dtype=torch.int64, device=device)
        self.slots = torch.zeros(rows * width, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=device)
        self.tables = torch.zeros(rows, table_width, dtype=torch.int32, device=device)
        # Row r's queries are rows r * width ... of the pass, one tile of the prefill kernel.
        self.query_start = torch.arange(rows + 1, dtype=torch.int32, device=device) * width
        self.tiles = torch.stack(
            [
                torch.arange(rows, dtype=torch.int32, device=device),
                torch.zeros(rows, dtype=torch.int32, device=device),
            ],
            1,
        )
        # On a GPU, `data` goes through page-locked buffers, taken in turn: a copy from them
        # never waits for the passes queued before it (the engine stages a pass while another
        # runs). Each is rewritten only once its last copy is done (its event).
        self._host: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        if device.type == "cuda":
            shape = tuple(self.staged.shape)
            self._host = [
                (torch.zeros(shape, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                for _ in range(2)
            ]
        self._turn = 0

    def fill(self, data: list[list[int]], chosen: torch.Tensor | None = None, fed: int = 0) -> None:
        """Stage `data` (one list per row, as laid out above) into the first len(data) rows.

        With `chosen` (token ids on the device, from a step not yet recorded), the first `fed`
        rows (one position each) feed tokens from it: each one's staged token is its index into
        `chosen`, gathered on the device straight into the pass's ids."""
        size, width = len(data), self.width
        staged = self.staged[:size]
        source = torch.tensor(data, dtype=torch.int64)
        if self._host:
            buffer, copied = self._host[self._turn]
            self._turn = 1 - self._turn
            copied.synchronize()
            source = buffer[:size].copy_(source)
        staged.copy_(source, non_blocking=True)
        if self._host:
            copied.record()
        if chosen is None:
            fed = 0
        elif width != 1:
            raise ValueError(
                f"tokens chosen on the device feed passes of one position, not {width}"
            )
        else:
            torch.index_select(chosen, 0, staged[:fed, 0], out=self.ids[:fed, 0])
        if fed < size:
            self.ids[fed:size].copy_(staged[fed:, :width])
        self.positions[:size].copy_(staged[:, width : 2 * width])
        self.slots[: size * width].copy_(staged[:, 2 * width : 3 * width].reshape(-1))
        self.lengths[:size].copy_(staged[:, 3 * width])
        self.tables[:size].copy_(staged[:, 3 * width + 1 :])

    def clear(self, size: int, null_slot: int, table: list[int]) -> None:
        """Padding rows in the first `size` rows (see `_padding`)."""
        self.fill([_padding(self.width, null_slot, table)] * size)


def _padding(width: int, null_slot: int, table: list[int]) -> list[int]:
    """A padding row of a decode pass: token 0 at positions 0, 1, ..., written to the null
    block. With one position it attends over nothing (length 0); with more, over its own
    positions in the null block, so that its queries see finite keys and write finite ones
    (the null block is where a real row's draft positions past its table read, masked)."""
    length = width if width > 1 else 0
    return [0] * width + list(range(width)) + [null_slot] * width + [length, *table]


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
        draft: int = 0,
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
        # The reference attention reads host-side lengths, which a replayed graph would not see.
        self.graphs = graphs and self.device.type == "cuda" and triton
        self.buckets = batch_buckets(max_batch)
        self.draft = draft
        # Table columns: the window, plus room for the draft positions a row near its end pads.
        self.width = -(-(max_context + draft) // cache.block_size)
        self._inputs: dict[int, _Inputs] = {}  # per positions per row: 1, and draft + 1
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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

    def decode(self, rows: list[Row], chosen: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each of `rows` (no draft); their next-token logits [len(rows), V].

        With `chosen` (token ids on the device, from a step whose tokens are not recorded yet),
        a row's one token is an index into `chosen`, and the pass feeds the token there."""
        return self._run(rows, 1, chosen)[:, 0]

    def verify(self, rows: list[Row]) -> list[torch.Tensor]:
        """Each row's last token and its draft in one pass; per row, the logits [len(tokens),
        V] after each of its tokens. On the GPU every row carries `verify_width` positions (one
        graph per batch bucket), those past a row's own tokens padding."""
        if self.graphs:
            width = self.verify_width(len(rows))
        else:
            width = max(len(row.tokens) for row in rows)
        logits = self._run(rows, width)
        return [logits[i, : len(row.tokens)] for i, row in enumerate(rows)]

    def verify_width(self, rows: int) -> int:
        """Positions per row of a verifying pass over `rows` rows (1: too many rows to verify a
        draft cheaply). On the GPU a pass of the batch bucket x width rows must fit one read of
        the weights (VERIFY_ROWS); on the CPU, where compute is the cost, the configured draft."""
        if not self.graphs:
            return self.draft + 1
        return verify_width(self.draft, bucket_of(rows, self.buckets))

    def verify_cost(self, rows: int) -> float:
        """What a verifying pass over `rows` rows costs against a plain one (VERIFY_COST)."""
        if not self.graphs:
            return 1.0 + CPU_COST_PER_POSITION * self.draft
        bucket = bucket_of(rows, self.buckets)
        return VERIFY_COST[max(b for b in VERIFY_COST if b <= bucket)]

    def _run(self, rows: list[Row], width: int, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """`rows` in a pass of `width` positions each; the logits [len(rows), width, V]."""
        count = len(rows)
        size = bucket_of(count, self.buckets) if self.graphs else count
        if self.graphs and (size, width) not in self._graphs:
            self._capture(size, width)  # before staging: capturing runs on (and clears) inputs
        block = self.cache.block_size
        null = NULL_BLOCK * block
        data = []
        for row in rows:
            if not 1 <= len(row.tokens) <= width:
                raise ValueError(f"a row of {len(row.tokens)} tokens in a pass of {width}")
            pad = width - len(row.tokens)
            span = range(row.position, row.position + len(row.tokens))
            slots = [slot_of(row.table, p, block) for p in span] + [null] * pad
            positions = list(range(row.position, row.position + width))
            tokens = row.tokens + [0] * pad
            data.append(
                [*tokens, *positions, *slots, row.position + width, *self._padded(row.table)]
            )
        data += [_padding(width, null, self._padded([]))] * (size - count)
        inputs = self._inputs_for(width)
        inputs.fill(data, chosen, fed=count)
        if self.graphs:
            graph, logits = self._graphs[size, width]
            graph.replay()
            return logits[:count]
        host = {
            "host_lengths": [row.position + width for row in rows],
            "keys": [row.key for row in rows],
        }
        return self._pass(inputs, size, **host)

    def _inputs_for(self, width: int) -> _Inputs:
        if width not in self._inputs:
            rows = self.buckets[-1]
            self._inputs[width] = _Inputs(rows, width, self.width, self.device)
        return self._inputs[width]

    def _padded(self, table: list[int]) -> list[int]:
        """A block table as a row of the `width`-column table tensor (null blocks after it)."""
        return table + [NULL_BLOCK] * (self.width - len(table))

    def capture_all(self) -> None:
        """Capture every decode graph now (largest batch first: one memory pool): one position
        per row, and with a draft, each bucket's verifying width."""
        if self.graphs:
            for size in reversed(self.buckets):
                for width in {1, self.verify_width(size)}:
                    if (size, width) not in self._graphs:
                        self._capture(size, width)

    def _pass(self, inputs: _Inputs, size: int, *, host_lengths: list[int], keys: list[int]):
        """The model over the first `size` rows of `inputs`: logits [size, width, V]."""
        width = inputs.width
        # One position per row: the split-K decode kernel. More: each row a chunk of `width`
        # queries, causal among themselves (as is every invariant decode: prefill arithmetic).
        batch = Pass(
            cache=self.cache,
            decode=width == 1,
            slots=inputs.slots[: size * width],
            tables=inputs.tables[:size],
            lengths=inputs.lengths[:size],
            query_start=inputs.query_start[: size + 1],
            tiles=inputs.tiles[:size],
            triton=self.triton,
            invariant=self.invariant,
            host_lengths=host_lengths,
            host_query_start=[width * i for i in range(size + 1)],
            keys=keys,
        )
        out = self.model(
            input_ids=inputs.ids[:size],
            position_ids=inputs.positions[:size],
            use_cache=False,
            logits_to_keep=0 if width > 1 else 1,
            onegpu_pass=batch,
        )
        return out.logits  # [size, width, V]

    def _capture(self, size: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if not self.cache.layers:
            raise RuntimeError("capture after the first pass: the cache is allocated by it")
        # Warm-up and capture run for real on padding rows (`_padding`): they write block 0.
        inputs = self._inputs_for(width)
        inputs.clear(size, NULL_BLOCK * self.cache.block_size, self._padded([]))
        padding = {"host_lengths": [0] * size, "keys": [-1] * size}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._pass(inputs, size, **padding)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(graph, pool=self._pool):
            logits = self._pass(inputs, size, **padding)
        self._graphs[size, width] = (graph, logits)
        log.info("captured the decode step for %d rows of %d positions", size, width)
        return graph, logits
