"""A KV cache of fixed rows ("slots"), one per running request, written in place.

Each row holds up to `length` positions of one sequence, starting at position 0, so rows may be
at different lengths: requests join and leave between decode steps without moving anyone's
cache. One extra column past `length` is scratch: idle rows write their (ignored) decode output
there, so a finished request's cache stays intact for prefix reuse.

It stands in for a transformers `Cache`: the attention layers call `update(key, value, layer)`.
Before each forward pass the caller says what that pass writes (`prefill` one row from a start
position, or `decode` one token into every row); the caller also passes position ids and an
explicit 4D attention mask, so the model never asks the cache for lengths. Every tensor the
decode path touches keeps its address, which lets one CUDA graph replay it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class _Prefill:
    row: int
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class _Decode:
    positions: torch.Tensor  # [slots] long, where each row writes this step
    kv_len: int  # columns every row attends over (a bucket >= the longest active row)


class SlotCache:
    """`slots` rows of `length` cached positions per layer, allocated on the first forward pass."""

    def __init__(self, slots: int, length: int) -> None:
        self.slots = slots
        self.length = length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None
        self._mode: _Prefill | _Decode | None = None

    @property
    def scratch(self) -> int:
        """The column idle rows write to; never attended."""
        return self.length

    @property
    def prefill_row(self) -> int | None:
        return self._mode.row if isinstance(self._mode, _Prefill) else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def prefill(self, row: int, start: int, count: int) -> None:
        """The next pass writes `count` positions of `row` from `start` (its cache before stays)."""
        if not 0 <= row < self.slots or start < 0 or start + count > self.length:
            raise ValueError(f"prefill of row {row} at {start}+{count} is outside the cache")
        self._mode = _Prefill(row, start, count)

    def decode(self, positions: torch.Tensor, kv_len: int) -> None:
        """The next pass writes one token per row at `positions` and attends over `kv_len`."""
        if not 0 < kv_len <= self.length:
            raise ValueError(f"kv_len {kv_len} is outside 1..{self.length}")
        self._mode = _Decode(positions, kv_len)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        """Store this pass's key/value [B, H, T, D] and return what the layer attends over."""
        if layer_idx == len(self.keys):
            self._allocate(key)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        mode = self._mode
        if isinstance(mode, _Prefill):
            end = mode.start + mode.count
            keys[mode.row, :, mode.start : end] = key[0]
            values[mode.row, :, mode.start : end] = value[0]
            return keys[mode.row : mode.row + 1, :, :end], values[mode.row : mode.row + 1, :, :end]
        if isinstance(mode, _Decode):
            keys[self._rows, :, mode.positions] = key[:, :, 0]
            values[self._rows, :, mode.positions] = value[:, :, 0]
            return keys[:, :, : mode.kv_len], values[:, :, : mode.kv_len]
        raise RuntimeError("SlotCache.update called before prefill() or decode()")

    def copy_prefix(self, src: int, dst: int, count: int) -> None:
        """Copy the first `count` cached positions of row `src` into row `dst`."""
        for tensor in self.keys + self.values:
            tensor[dst, :, :count] = tensor[src, :, :count]

    def _allocate(self, like: torch.Tensor) -> None:
        shape = (self.slots, like.shape[1], self.length + 1, like.shape[3])
        self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        if self._rows is None:
            self._rows = torch.arange(self.slots, device=like.device)


def bytes_per_token(config, dtype: torch.dtype) -> int | None:
    """KV bytes one cached position costs for a transformers config (None if unreadable)."""
    config = getattr(config, "text_config", config)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8
