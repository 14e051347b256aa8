"""One decode pass over every row of the slot cache, replayed from a CUDA graph on the GPU.

Eager decoding of an 8-bit 14B model is bound by launching ~300 small kernels per token from
Python, not by the GPU. A CUDA graph records the whole pass once per attention length (a
bucket) and replays it with one launch. Everything the pass reads (ids, positions, the mask
derived from them) lives in fixed tensors that are refilled in place before each replay.
"""

from __future__ import annotations

import logging

import torch

from onegpu.engine.kvcache import SlotCache

log = logging.getLogger(__name__)

MIN_BUCKET = 64


def kv_bucket(needed: int, length: int) -> int:
    """The attention length a pass uses: the next power of two >= `needed` (>= 64), <= `length`."""
    bucket = MIN_BUCKET
    while bucket < needed:
        bucket *= 2
    return min(bucket, length)


def mask_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype attention runs in (an additive mask must match it)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores: 0 where `visible`, the dtype's minimum elsewhere.

    The minimum rather than -inf, so that a row that sees nothing softmaxes to uniform, not NaN.
    """
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)


class DecodeStep:
    """Feeds one token per row and returns the next-token logits of every row [slots, V].

    Idle rows take part too (a fixed batch is what makes one graph per bucket possible); they
    write to the cache's scratch column and their logits are ignored.
    """

    def __init__(self, model: torch.nn.Module, cache: SlotCache, *, graphs: bool) -> None:
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.graphs = graphs and self.device.type == "cuda"
        slots = cache.slots
        self.dtype = mask_dtype(model)
        self._input_ids = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._write_at = torch.full((slots,), cache.scratch, dtype=torch.long, device=self.device)
        self._columns = torch.arange(cache.length, device=self.device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def capture_all(self) -> None:
        """Capture every bucket now (longest first, so shorter ones reuse its memory pool)."""
        if not self.graphs:
            return
        buckets = sorted({kv_bucket(n, self.cache.length) for n in range(1, self.cache.length + 1)})
        for kv_len in reversed(buckets):
            if kv_len not in self._captured:
                self._captured[kv_len] = self._capture(kv_len)

    def __call__(self, feed: dict[int, tuple[int, int]]) -> torch.Tensor:
        """`feed[row] = (token id, position)` for each running row; logits [slots, V]."""
        kv_len = kv_bucket(max(position for _, position in feed.values()) + 1, self.cache.length)
        if self.graphs and kv_len not in self._captured:
            self._captured[kv_len] = self._capture(kv_len)
        slots = self.cache.slots
        host = torch.zeros(3, slots, dtype=torch.long)
        host[2] = self.cache.scratch
        for row, (token_id, position) in feed.items():
            host[0, row], host[1, row], host[2, row] = token_id, position, position
        staged = host.to(self.device, non_blocking=True)
        self._input_ids.copy_(staged[0, :, None])
        self._positions.copy_(staged[1, :, None])
        self._write_at.copy_(staged[2])
        if self.graphs:
            graph, logits = self._captured[kv_len]
            graph.replay()
            return logits
        return self._forward(kv_len)

    def _forward(self, kv_len: int) -> torch.Tensor:
        # Row r sees columns 0..position[r]; idle rows (position 0) see column 0 only.
        visible = self._columns[:kv_len] <= self._positions  # [slots, kv_len]
        mask = additive_mask(visible, self.dtype)[:, None, None, :]
        self.cache.decode(self._write_at, kv_len)
        out = self.model(
            input_ids=self._input_ids,
            position_ids=self._positions,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _capture(self, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up and capture run the pass for real: every row must write to scratch only.
        self._input_ids.zero_()
        self._positions.zero_()
        self._write_at.fill_(self.cache.scratch)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(kv_len)
        log.info("captured the decode step for %d positions", kv_len)
        return graph, logits
