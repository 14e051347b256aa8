"""Attention over the paged KV cache, plugged into transformers' attention interface.

The engine registers `paged_attention` under ATTENTION_NAME and switches the model to it, so a
transformers model (Qwen2, Llama, ...) runs unchanged: each attention layer hands us its query
and its new key/value (rotary already applied), we write the new positions into the pool and
attend over each sequence's blocks. What a pass computes (`Pass`) comes as a model keyword, the
way transformers passes flash-attention's sequence offsets.

Two kinds of pass:
- decode: one new token for each of B rows; a row attends over `lengths[row]` positions.
- prefill: packed chunks of several prompts in one [1, N] batch; a chunk's token at position p
  attends over its own sequence's positions 0..p (cached prefix + the chunk so far).

Backends: Triton kernels on CUDA (`kernels.py`, no gathered copies, safe to capture in a CUDA
graph), and a reference in plain torch (gather the blocks, then SDPA) for the CPU and for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from onegpu.engine.kvcache import Layer, PagedKVCache, gather

ATTENTION_NAME = "onegpu_paged"

# Query rows per program of the Triton prefill kernel (also the tile size of `Pass.tiles`).
PREFILL_TILE = 32
# Batch-invariant CPU attention: a query attends over a window of a multiple of this many
# positions (the ones after it masked). 256 made a 1,000-token prefill 6x faster than one SDPA
# call per query, with the same invariance.
KEY_WINDOW = 256


@dataclass
class Pass:
    """One forward pass over the paged cache (device tensors, plus host copies for the CPU)."""

    cache: PagedKVCache
    decode: bool
    slots: torch.Tensor  # [N] long: where each new token's key/value go
    tables: torch.Tensor  # [S, W] int32: each sequence's block table (0-padded)
    lengths: torch.Tensor  # [S] int32: positions each sequence attends over after this pass
    query_start: torch.Tensor | None = None  # prefill: [S + 1] int32, chunk offsets in the pack
    tiles: torch.Tensor | None = None  # prefill: [n, 2] int32, (sequence, first query row)
    triton: bool = False
    # Batch-invariant attention (--deterministic): a query's result depends on its own
    # sequence's positions only, and decode computes exactly what prefill would.
    invariant: bool = False
    host_lengths: list[int] = field(default_factory=list)
    host_query_start: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # the engine's id of each sequence


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    onegpu_pass: Pass | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, Hq, T, D], key/value [B, Hkv, T, D]."""
    if onegpu_pass is None:
        return _unpaged(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    batch, q_heads, steps, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    rows = batch * steps
    if key is None:  # the rotary kernel stored this pass's keys and values (`rope_write`)
        layer = onegpu_pass.cache.layers[module.layer_idx]
    else:
        kv_heads = key.shape[1]
        new_keys = key.transpose(1, 2).reshape(rows, kv_heads, dim)
        new_values = value.transpose(1, 2).reshape(rows, kv_heads, dim)
        layer = onegpu_pass.cache.write(module.layer_idx, new_keys, new_values, onegpu_pass.slots)
    q = query.transpose(1, 2).reshape(rows, q_heads, dim)  # [N, Hq, D]
    p = onegpu_pass
    if p.triton:
        from onegpu.engine import kernels

        if p.decode and not p.invariant:
            out = kernels.decode(q, layer, p.tables, p.lengths, scale)
        else:  # invariant decode rows are chunks of one query: the prefill kernel's arithmetic
            out = kernels.prefill(
                q, layer, p.tables, p.query_start, p.lengths, p.tiles, scale, tile=PREFILL_TILE
            )
    elif p.invariant:
        out = invariant_reference(q, layer, p, scale)
    elif p.decode:
        out = decode_reference(q, layer, p, scale)
    else:
        out = prefill_reference(q, layer, p, scale)
    return out.view(batch, steps, q_heads, dim), None


def decode_reference(q: torch.Tensor, layer: Layer, p: Pass, scale: float) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]: each row over its first `lengths[row]` cached positions."""
    lengths = p.host_lengths
    block_size = layer.keys.shape[1]
    width = -(-max(max(lengths), 1) // block_size)
    keys, values = gather(layer, p.tables[:, :width], q.dtype)  # [B, L, Hkv, D]
    positions = torch.arange(width * block_size, device=q.device)
    visible = positions[None, :] < torch.tensor(lengths, device=q.device)[:, None]  # [B, L]
    visible[:, 0] = True  # a padding row (length 0) must not softmax over nothing
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0, :]


def prefill_reference(q: torch.Tensor, layer: Layer, p: Pass, scale: float) -> torch.Tensor:
    """q [N, Hq, D] (packed chunks) -> [N, Hq, D], causal within each sequence."""
    out = torch.empty_like(q)
    block_size = layer.keys.shape[1]
    starts = p.host_query_start
    for s, length in enumerate(p.host_lengths):
        begin, end = starts[s], starts[s + 1]
        blocks = p.tables[s, : -(-length // block_size)]
        keys, values = gather(layer, blocks, q.dtype)  # [>= L, Hkv, D]
        keys, values = keys[:length], values[:length]
        context = length - (end - begin)  # positions cached before this chunk
        query_pos = torch.arange(context, length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]  # [T, L]
        out[begin:end] = F.scaled_dot_product_attention(
            q[begin:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=visible,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def invariant_reference(q: torch.Tensor, layer: Layer, p: Pass, scale: float) -> torch.Tensor:
    """q [N, Hq, D] -> [N, Hq, D]: the batch-invariant CPU attention.

    A query at position t attends over a window of the first `KEY_WINDOW * ceil((t + 1) /
    KEY_WINDOW)` positions of its sequence, those after t masked out, so the shapes of its
    products depend on t alone. Queries with the same window and the same padded row count are
    stacked into one batched product; the BLAS computes each row of it the same way whatever
    the rows beside it (padded to multiples of ROW_TILE). A query thus gets the same numbers in a
    decode pass or in any prefill chunk, alone or beside other sequences.
    """
    from onegpu.engine.invariant import ROW_TILE

    out = torch.zeros_like(q)
    tokens, q_heads, dim = q.shape
    block_size = layer.keys.shape[1]
    starts = range(len(p.host_lengths) + 1) if p.decode else p.host_query_start
    # (padded rows, window) -> [(rows of q, keys [Hq, W, D], values, positions [rows])]
    stacks: dict[tuple[int, int], list] = {}
    for s, length in enumerate(p.host_lengths):
        begin, end = starts[s], starts[s + 1]
        if length == 0:  # a padding row
            continue
        first = length - (end - begin)  # position of the chunk's first query
        windows = {}
        for row in range(begin, end):
            window = -(-(first + row - begin + 1) // KEY_WINDOW) * KEY_WINDOW
            windows.setdefault(window, []).append(row)
        blocks = -(-max(windows) // block_size)
        keys, values = gather(layer, p.tables[s, :blocks], q.dtype)  # [W', Hkv, D]
        if keys.shape[0] < max(windows):
            pad = max(windows) - keys.shape[0]
            keys, values = F.pad(keys, (0, 0, 0, 0, 0, pad)), F.pad(values, (0, 0, 0, 0, 0, pad))
        group = q_heads // keys.shape[1]
        for window, rows in windows.items():
            k = keys[:window].transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, W, D]
            v = values[:window].transpose(0, 1).repeat_interleave(group, dim=0)
            padded = -(-len(rows) // ROW_TILE) * ROW_TILE
            positions = torch.tensor([first + r - begin for r in rows])
            stacks.setdefault((padded, window), []).append((rows, k, v, positions))
    for (padded, window), entries in stacks.items():
        queries = torch.zeros(len(entries), q_heads, padded, dim, dtype=q.dtype)
        position = torch.full((len(entries), padded), -1)  # padding rows see nothing
        for i, (rows, _, _, positions) in enumerate(entries):
            queries[i, :, : len(rows)] = q[rows].transpose(0, 1)
            position[i, : len(rows)] = positions
        keys = torch.stack([k for _, k, _, _ in entries])  # [E, Hq, W, D]
        values = torch.stack([v for _, _, v, _ in entries])
        flat = (-1, padded, dim)
        scores = torch.bmm(queries.reshape(flat), keys.reshape(-1, window, dim).transpose(1, 2))
        scores = scores.view(len(entries), q_heads, padded, window) * scale
        hidden = torch.arange(window)[None, None, :] > position[:, :, None]  # [E, rows, W]
        scores.masked_fill_(hidden[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # padding rows: all masked
        mixed = torch.bmm(weights.reshape(-1, padded, window), values.reshape(-1, window, dim))
        mixed = mixed.view(len(entries), q_heads, padded, dim)
        for i, (rows, _, _, _) in enumerate(entries):
            out[rows] = mixed[i, :, : len(rows)].transpose(0, 1)
    return out


def _unpaged(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """A call from outside the engine (e.g. transformers' generate() in a benchmark): SDPA.

    transformers builds no mask for a custom attention, so only unpadded single sequences are
    right here; anything else is refused rather than answered wrongly.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[0] != 1 or attention_mask is not None:
        raise RuntimeError(
            "the model is set up for onegpu's paged attention; outside the engine only single "
            "unpadded sequences are supported"
        )
    return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)


def install(model: torch.nn.Module) -> None:
    """Register `paged_attention` with transformers and switch `model` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise TypeError(f"{type(model).__name__} does not use transformers' attention interface")
    setter(ATTENTION_NAME)


def prefill_tiles(chunk_lengths: list[int], tile: int = PREFILL_TILE) -> list[tuple[int, int]]:
    """(sequence, first query row) for each tile of `tile` query rows of each packed chunk."""
    return [(s, start) for s, n in enumerate(chunk_lengths) for start in range(0, n, tile)]
