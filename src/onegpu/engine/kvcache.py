"""The KV cache tensors: per layer, one pool of blocks that every running sequence writes into.

A layer's keys live in `[num_blocks, block_size, kv_heads, head_dim]` (values alike); position
p of a sequence is slot `table[p // block_size] * block_size + p % block_size`. Which block
belongs to whom is `blocks.BlockPool`'s business; this module only stores and reads.

`kv_dtype="int8"` stores each (position, head) vector as int8 with its own float32 scale
(absmax / 127): about half the bytes of fp16, so about twice the positions fit in the same
memory. Attention dequantizes on the fly (`gather` here, the Triton kernels on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from onegpu.engine.config import KvCacheDtype

KV_DTYPES = get_args(KvCacheDtype)


@dataclass
class Layer:
    """One layer's pools (and, for int8, their per-position-and-head scales)."""

    keys: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    values: torch.Tensor
    key_scales: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads] float32
    value_scales: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None


def slot_of(table: list[int], position: int, block_size: int) -> int:
    """Where `position` of the sequence with block table `table` lives in a flattened pool."""
    return table[position // block_size] * block_size + position % block_size


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: (codes like x, scales [..., ] float32)."""
    scales = x.float().abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    codes = torch.round(x.float() / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


class PagedKVCache:
    """The pools of every layer, allocated on the first write (shapes come from the model)."""

    def __init__(self, num_blocks: int, block_size: int, *, kv_dtype: str = "auto") -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {kv_dtype!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.layers: dict[int, Layer] = {}

    def nbytes(self) -> int:
        tensors = [
            t
            for layer in self.layers.values()
            for t in (layer.keys, layer.values, layer.key_scales, layer.value_scales)
            if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def layer(self, layer_idx: int, like: torch.Tensor) -> Layer:
        """A layer's pools, allocated on first use for rows like `like` [..., kv_heads, dim]."""
        return self.layers.get(layer_idx) or self._allocate(layer_idx, like)

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor):
        """Store this pass's key/value rows [N, kv_heads, head_dim] at `slots` [N]."""
        layer = self.layer(layer_idx, key)
        heads, dim = key.shape[-2:]
        if layer.quantized:
            for codes_pool, scale_pool, x in (
                (layer.keys, layer.key_scales, key),
                (layer.values, layer.value_scales, value),
            ):
                codes, scales = quantize_int8(x)
                codes_pool.view(-1, heads, dim).index_copy_(0, slots, codes)
                scale_pool.view(-1, heads).index_copy_(0, slots, scales)
            return layer
        layer.keys.view(-1, heads, dim).index_copy_(0, slots, key.to(layer.keys.dtype))
        layer.values.view(-1, heads, dim).index_copy_(0, slots, value.to(layer.values.dtype))
        return layer

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> Layer:
        heads, dim = like.shape[-2:]
        shape = (self.num_blocks, self.block_size, heads, dim)
        device = like.device
        if self.kv_dtype == "int8":
            layer = Layer(
                keys=torch.zeros(shape, dtype=torch.int8, device=device),
                values=torch.zeros(shape, dtype=torch.int8, device=device),
                key_scales=torch.zeros(shape[:-1], dtype=torch.float32, device=device),
                value_scales=torch.zeros(shape[:-1], dtype=torch.float32, device=device),
            )
        else:
            layer = Layer(
                keys=torch.zeros(shape, dtype=like.dtype, device=device),
                values=torch.zeros(shape, dtype=like.dtype, device=device),
            )
        self.layers[layer_idx] = layer
        return layer


def gather(layer: Layer, blocks: torch.Tensor, dtype: torch.dtype):
    """Keys and values held in `blocks` [..., n]: two [..., n * block_size, heads, dim]."""
    blocks = blocks.long()
    out = []
    for pool, scales in ((layer.keys, layer.key_scales), (layer.values, layer.value_scales)):
        x = pool[blocks].flatten(-4, -3)  # [..., n * block_size, heads, dim]
        if scales is not None:
            x = x.float() * scales[blocks].flatten(-3, -2)[..., None]
        out.append(x.to(dtype))
    return out[0], out[1]


def bytes_per_token(config, dtype: torch.dtype, kv_dtype: str = "auto") -> int | None:
    """KV bytes one cached position costs for a transformers config (None if unreadable)."""
    config = getattr(config, "text_config", config)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # int8: one byte per value plus one float32 scale per (position, head).
    per_head = head_dim + 4 if kv_dtype == "int8" else head_dim * torch.finfo(dtype).bits // 8
    return layers * 2 * kv_heads * per_head
