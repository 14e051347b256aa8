"""Attention over the paged cache: the torch reference against dense attention, and the Triton
kernels against the reference (compiled on CUDA, in Triton's interpreter on the CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from onegpu.engine.attention import (
    PREFILL_TILE,
    Pass,
    decode_reference,
    prefill_reference,
    prefill_tiles,
)
from onegpu.engine.forward import batch_buckets, bucket_of
from onegpu.engine.kvcache import PagedKVCache, slot_of
from tests.conftest import DEVICES

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

BLOCK = 16
Q_HEADS, KV_HEADS = 4, 2


def filled_cache(lengths, dim, *, kv_dtype="auto", device="cpu", dtype=torch.float32, seed=0):
    """A pool whose sequences (blocks scattered at random) hold random keys and values;
    also the dense [L, Hkv, D] keys and values each sequence wrote."""
    generator = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // BLOCK) for n in lengths) + 4
    cache = PagedKVCache(blocks, BLOCK, kv_dtype=kv_dtype)
    order = (torch.randperm(blocks - 1, generator=generator) + 1).tolist()
    width = max(-(-n // BLOCK) for n in lengths) + 1
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    dense = []
    for s, n in enumerate(lengths):
        count = -(-n // BLOCK)
        tables[s, :count] = torch.tensor([order.pop() for _ in range(count)])
        keys = torch.randn(n, KV_HEADS, dim, generator=generator).to(device, dtype)
        values = torch.randn(n, KV_HEADS, dim, generator=generator).to(device, dtype)
        positions = torch.arange(n)
        slots = (tables[s, positions // BLOCK].long() * BLOCK + positions % BLOCK).to(device)
        cache.write(0, keys, values, slots)
        dense.append((keys, values))
    return cache, tables.to(device), dense


def dense_attention(q, keys, values, context, scale):
    """q [T, Hq, D] at positions context.. over keys/values [L, Hkv, D], causal."""
    length = keys.shape[0]
    positions = torch.arange(context, context + q.shape[0])
    visible = torch.arange(length)[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(),
        keys.transpose(0, 1).float(),
        values.transpose(0, 1).float(),
        attn_mask=visible.to(q.device),
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)


def decode_pass(cache, tables, lengths, device):
    return Pass(
        cache=cache,
        decode=True,
        slots=None,
        tables=tables,
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        host_lengths=list(lengths),
    )


def prefill_pass(cache, tables, lengths, chunks, device):
    starts = [0]
    for n in chunks:
        starts.append(starts[-1] + n)
    return Pass(
        cache=cache,
        decode=False,
        slots=None,
        tables=tables,
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        query_start=torch.tensor(starts, dtype=torch.int32, device=device),
        tiles=torch.tensor(prefill_tiles(chunks), dtype=torch.int32, device=device),
        host_lengths=list(lengths),
        host_query_start=starts,
    )


@pytest.mark.parametrize("dim", [16, 24])
def test_reference_decode_equals_dense_attention(dim):
    lengths = [37, 16, 70]
    cache, tables, dense = filled_cache(lengths, dim)
    q = torch.randn(len(lengths), Q_HEADS, dim)
    out = decode_reference(q, cache.layers[0], decode_pass(cache, tables, lengths, "cpu"), 0.3)
    for s, n in enumerate(lengths):
        expected = dense_attention(q[s : s + 1], *dense[s], n - 1, 0.3)
        torch.testing.assert_close(out[s : s + 1], expected, atol=1e-5, rtol=1e-5)


def test_reference_prefill_is_causal_within_each_packed_chunk():
    lengths, chunks = [37, 70, 5], [5, 40, 5]  # the last one is a whole prompt
    cache, tables, dense = filled_cache(lengths, 16)
    q = torch.randn(sum(chunks), Q_HEADS, 16)
    p = prefill_pass(cache, tables, lengths, chunks, "cpu")
    out = prefill_reference(q, cache.layers[0], p, 0.25)
    begin = 0
    for s, (n, c) in enumerate(zip(lengths, chunks, strict=True)):
        expected = dense_attention(q[begin : begin + c], *dense[s], n - c, 0.25)
        torch.testing.assert_close(out[begin : begin + c], expected, atol=1e-5, rtol=1e-5)
        begin += c


def test_int8_keys_and_values_stay_close_to_the_originals():
    cache, tables, dense = filled_cache([50], 32, kv_dtype="int8")
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.quantized
    from onegpu.engine.kvcache import gather

    keys, values = gather(layer, tables[0, :4], torch.float32)
    # Symmetric int8 per (position, head): error at most half a step of absmax / 127.
    for got, want in ((keys[:50], dense[0][0]), (values[:50], dense[0][1])):
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((got - want).abs() <= step / 2 + 1e-6).all()


def kernel_devices():
    return [
        pytest.param(device, marks=needs_triton) if device == "cpu" else device
        for device in DEVICES
    ]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("dim", [16, 24, 64])
@pytest.mark.parametrize("few_rows", [8, 0], ids=["splits-of-4", "splits-of-16"])
def test_triton_kernels_equal_the_reference(device, kv_dtype, dim, few_rows, monkeypatch):
    from onegpu.engine import kernels

    monkeypatch.setattr(kernels, "FEW_ROWS", few_rows)  # 4 rows: decode splits of 4 or 16 blocks
    dtype = torch.float16 if device == "cuda" else torch.float32
    tol = {"atol": 2e-3, "rtol": 2e-3} if device == "cuda" else {"atol": 1e-5, "rtol": 1e-5}
    lengths = [37, 300, 1, 0]  # 300 spans 2 splits of 16 blocks, 5 of 4; 0 is a padding row
    cache, tables, _ = filled_cache(lengths, dim, kv_dtype=kv_dtype, device=device, dtype=dtype)
    layer = cache.layers[0]
    q = torch.randn(len(lengths), Q_HEADS, dim).to(device, dtype)
    p = decode_pass(cache, tables, lengths, device)
    got = kernels.decode(q, layer, p.tables, p.lengths, 0.2)
    want = decode_reference(q, layer, p, 0.2)
    torch.testing.assert_close(got[:3], want[:3], **tol)
    assert got[3].abs().max() == 0  # a padding row reads nothing

    lengths, chunks = [37, 300, 1], [5, 100, 1]
    cache, tables, _ = filled_cache(lengths, dim, kv_dtype=kv_dtype, device=device, dtype=dtype)
    layer = cache.layers[0]
    q = torch.randn(sum(chunks), Q_HEADS, dim).to(device, dtype)
    p = prefill_pass(cache, tables, lengths, chunks, device)
    got = kernels.prefill(
        q, layer, p.tables, p.query_start, p.lengths, p.tiles, 0.2, tile=PREFILL_TILE
    )
    torch.testing.assert_close(got, prefill_reference(q, layer, p, 0.2), **tol)


@pytest.mark.parametrize("device", kernel_devices())
def test_decode_leaves_its_split_counters_at_zero_for_the_next_layer(device):
    """Each (row, head)'s last split merges and resets its counter: a second layer, or the same
    layer again, merges at the right split (a counter left over would merge too early, or never)."""
    from onegpu.engine import kernels

    dtype = torch.float16 if device == "cuda" else torch.float32
    lengths = [300, 37, 129]  # 5, 1 and 3 splits of 4 blocks
    cache, tables, _ = filled_cache(lengths, 16, device=device, dtype=dtype)
    layer = cache.layers[0]
    p = decode_pass(cache, tables, lengths, device)
    for seed in range(3):
        q = torch.randn(len(lengths), Q_HEADS, 16, generator=torch.Generator().manual_seed(seed))
        q = q.to(device, dtype)
        got = kernels.decode(q, layer, p.tables, p.lengths, 0.2)
        want = decode_reference(q, layer, p, 0.2)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        assert int(kernels._counts(q.device, 0).abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize(("rows", "blocks"), [(1, 4), (8, 4), (9, 16), (32, 16)])
def test_decode_programs_walk_fewer_blocks_when_few_rows_share_the_pass(rows, blocks):
    from onegpu.engine.kernels import split_blocks

    assert split_blocks(rows) == blocks


@pytest.mark.parametrize(
    ("table", "position", "slot"),
    [([7], 0, 112), ([7], 15, 127), ([7, 3], 16, 48), ([7, 3], 20, 52), ([5, 9, 2], 47, 47)],
)
def test_a_position_lives_in_its_blocks_slot(table, position, slot):
    assert slot_of(table, position, BLOCK) == slot


@pytest.mark.parametrize(
    ("chunks", "tiles"),
    [
        ([5], [(0, 0)]),
        ([32], [(0, 0)]),
        ([33, 1], [(0, 0), (0, 32), (1, 0)]),
        ([70], [(0, 0), (0, 32), (0, 64)]),
    ],
)
def test_prefill_tiles_cover_every_query_row_once(chunks, tiles):
    assert prefill_tiles(chunks, tile=32) == tiles


@pytest.mark.parametrize(
    ("max_batch", "buckets"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (32, [1, 2, 4, 8, 16, 24, 32]),
        (40, [1, 2, 4, 8, 16, 24, 32, 40]),
        (64, [1, 2, 4, 8, 16, 24, 32, 48, 64]),
    ],
)
def test_decode_graphs_are_captured_per_batch_bucket(max_batch, buckets):
    assert batch_buckets(max_batch) == buckets
    assert [bucket_of(n, buckets) for n in (1, max_batch)] == [1, max_batch]


@pytest.mark.parametrize(("rows", "bucket"), [(1, 1), (3, 4), (5, 8), (9, 16), (17, 24)])
def test_a_batch_pads_to_the_next_bucket(rows, bucket):
    assert bucket_of(rows, batch_buckets(32)) == bucket


# -- the rotary + KV store kernel's load-time check ------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_the_rotary_store_kernel_passes_its_own_check(device):
    """What `fuse` runs at load on a GPU (here also in Triton's interpreter): Qwen-14B's 40
    heads of 128, and a GQA layout with head size 64."""
    from onegpu.engine import kernels

    assert kernels.check_rope_write(40, 40, 128, torch.float32, torch.device(device)) is None
    assert kernels.check_rope_write(14, 2, 64, torch.float32, torch.device(device)) is None


def test_the_check_names_what_a_broken_rotary_store_kernel_gets_wrong(monkeypatch):
    from onegpu.engine import kernels

    real = kernels.rope_write

    def keys_not_stored(qkv, cos, sin, slots, layer, q_heads):
        q = real(qkv, cos, sin, slots, layer, q_heads)
        layer.keys.zero_()
        return q

    monkeypatch.setattr(kernels, "rope_write", keys_not_stored)
    problem = kernels.check_rope_write(4, 2, 16, torch.float32, torch.device("cpu"))
    assert problem is not None and problem.startswith("its keys differ")

    def fails(*args):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(kernels, "rope_write", fails)
    problem = kernels.check_rope_write(4, 2, 16, torch.float32, torch.device("cpu"))
    assert problem == "RuntimeError: no kernel image for this GPU"
