"""Triton kernels for attention over the paged KV cache (CUDA; the Triton interpreter on a CPU).

decode: split-K ("flash decoding"). Program (row, head, split) runs an online softmax over up
to `split_blocks(rows)` blocks of its row's table, BLOCKS_PER_STEP at a time, and writes a partial
result; the last split of a (row, head) to finish merges them (a row of one split writes its
output directly). The grid depends only on the batch and the table width, never on the lengths,
so a replayed CUDA graph stays valid as sequences grow: programs past a row's length return at
once.

prefill: flash attention over packed chunks. Program (tile, head) takes up to `tile` query
rows of one sequence's chunk and walks that sequence's blocks up to its last query position,
causal on the diagonal. Cached prefixes are read from the pool where they are, never copied.

int8 pools are dequantized on load with their per-(position, head) scales. Head sizes that are
not a power of two are padded with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from onegpu.engine.kvcache import Layer

# Blocks one decode program walks. A few rows: 4 blocks (64 positions, one loop step), so a short
# context is spread over many programs rather than walked by one program's dependent loads (H100,
# one row of the 14B at context 128-192: 581 -> 210 us of attention per step, merge 79 -> 87 us,
# 7.86 -> 7.49 ms per step). Many rows fill the GPU by themselves and keep 16 blocks (256
# positions), with fewer partial results to merge (16 rows: 10.17 ms per step, 10.28 with 4).
SPLIT_BLOCKS_FEW = 4
SPLIT_BLOCKS_MANY = 16
FEW_ROWS = 8
# Blocks a decode program loads at once (one gathered [64, D] tile): each loop step waits on
# memory, so fewer, larger steps. One block per step made a 128-token decode take 21 us per
# layer on an H200, seven times its KV read.
BLOCKS_PER_STEP = 4


@triton.jit
def _decode(
    Q, K, V, KS, VS, TABLES, LENGTHS, ACC, MAX, SUM, COUNTS, OUT,
    scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_sb, stride_st, stride_sh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    SPLIT: tl.constexpr, SP: tl.constexpr, PER: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(LENGTHS + row)
    used = tl.cdiv(length, BLOCK * SPLIT)  # splits with positions to read (0: a padding row)
    first = split * SPLIT
    blocks = tl.maximum(tl.minimum(tl.cdiv(length, BLOCK) - first, SPLIT), 0)
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    out_at = OUT + row * stride_ob + head * stride_oh + dims
    if used == 0:
        if split == 0:  # a padding row reads nothing and gives 0
            tl.store(out_at, tl.zeros([DP], tl.float32).to(OUT.dtype.element_ty), mask=dim_ok)
    elif blocks > 0:  # splits past the row's length do nothing
        kv_head = head // GROUP
        offsets = tl.arange(0, BLOCK * PER)  # positions of one step: PER blocks side by side
        in_block = offsets % BLOCK
        q = tl.load(Q + row * stride_qb + head * stride_qh + dims, mask=dim_ok, other=0.0)
        q = q.to(tl.float32) * scale
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([DP], tl.float32)
        for i in range(0, tl.cdiv(blocks, PER)):
            index = first + i * PER  # the step's first block in the row's table
            owner = index + offsets // BLOCK  # each position's entry in the table
            listed = owner < first + blocks
            block = tl.load(TABLES + row * stride_tb + owner, mask=listed, other=0).to(tl.int64)
            kv = (
                block[:, None] * stride_kb
                + in_block[:, None] * stride_kt
                + kv_head * stride_kh
                + dims[None, :]
            )  # big pools: 64-bit offsets
            mask = listed[:, None] & dim_ok[None, :]
            k = tl.load(K + kv, mask=mask, other=0.0).to(tl.float32)  # [BLOCK * PER, DP]
            if QUANT:
                at = block * stride_sb + in_block * stride_st + kv_head * stride_sh
                k = k * tl.load(KS + at, mask=listed, other=0.0)[:, None]
            scores = tl.sum(k * q[None, :], axis=1)  # [BLOCK * PER]
            scores = tl.where(index * BLOCK + offsets < length, scores, float("-inf"))
            v = tl.load(V + kv, mask=mask, other=0.0).to(tl.float32)
            if QUANT:
                v = v * tl.load(VS + at, mask=listed, other=0.0)[:, None]
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        if used == 1:  # one split holds the whole row: its result is the output
            out = acc / tl.maximum(total, 1e-30)
            tl.store(out_at, out.to(OUT.dtype.element_ty), mask=dim_ok)
        else:
            partial = row * stride_ab + head * stride_ah + split * stride_as
            tl.store(ACC + partial + dims, acc, mask=dim_ok)
            stats = row * stride_mb + head * stride_mh + split + tl.arange(0, 1)
            tl.store(MAX + stats, m)
            tl.store(SUM + stats, total)
            # The last split of (row, head) to finish merges them all, in split order (so the
            # result does not depend on which was last) and sets the counter back to 0 for the
            # next layer and step: the whole program's stores come before its count.
            tl.debug_barrier()
            count = COUNTS + row * tl.num_programs(1) + head
            if tl.atomic_add(count, 1, sem="acq_rel") == used - 1:
                splits = tl.arange(0, SP)
                ran = splits < used
                at = row * stride_mb + head * stride_mh + splits
                maxes = tl.load(MAX + at, mask=ran, other=-1e30, cache_modifier=".cg")
                sums = tl.load(SUM + at, mask=ran, other=0.0, cache_modifier=".cg")
                weight = tl.exp(maxes - tl.max(maxes, axis=0))  # [SP]
                partials = tl.load(
                    ACC
                    + row * stride_ab
                    + head * stride_ah
                    + splits[:, None] * stride_as
                    + dims[None, :],
                    mask=ran[:, None] & dim_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                numerator = tl.sum(partials * weight[:, None], axis=0)
                denominator = tl.maximum(tl.sum(sums * weight, axis=0), 1e-30)
                tl.store(out_at, (numerator / denominator).to(OUT.dtype.element_ty), mask=dim_ok)
                tl.store(count, 0)


@triton.jit
def _prefill(
    Q, K, V, KS, VS, TABLES, QUERY_START, LENGTHS, TILES, OUT,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_sb, stride_st, stride_sh,
    stride_tb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    TILE: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(TILES + tile * 2)
    first_row = tl.load(TILES + tile * 2 + 1)  # within the chunk
    begin = tl.load(QUERY_START + seq)
    chunk = tl.load(QUERY_START + seq + 1) - begin
    length = tl.load(LENGTHS + seq)
    context = length - chunk  # positions cached before this chunk
    kv_head = head // GROUP
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    rows = first_row + tl.arange(0, TILE)
    row_ok = rows < chunk
    q = tl.load(
        Q + (begin + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)
    positions = context + rows  # [TILE] absolute positions of the queries
    last = context + tl.minimum(first_row + TILE, chunk) - 1
    offsets = tl.arange(0, BLOCK)
    m = tl.full([TILE], float("-inf"), tl.float32)
    total = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, DP], tl.float32)
    for index in range(0, last // BLOCK + 1):
        block = tl.load(TABLES + seq * stride_tb + index).to(tl.int64)
        kv = block * stride_kb + offsets[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        k = tl.load(K + kv, mask=dim_ok[None, :], other=0.0)  # [BLOCK, DP]
        v = tl.load(V + kv, mask=dim_ok[None, :], other=0.0)
        if QUANT:
            at = block * stride_sb + offsets * stride_st + kv_head * stride_sh
            k = (k.to(tl.float32) * tl.load(KS + at)[:, None]).to(Q.dtype.element_ty)
            v = (v.to(tl.float32) * tl.load(VS + at)[:, None]).to(Q.dtype.element_ty)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [TILE, BLOCK] fp32
        visible = (index * BLOCK + offsets)[None, :] <= positions[:, None]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    # A padding row (length 0) saw nothing: 0, not 0 / 0. Any real row has total >= 1.
    out = acc / tl.maximum(total, 1e-30)[:, None]
    tl.store(
        OUT + (begin + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def split_blocks(rows: int) -> int:
    """Blocks of the table each decode program walks, for a pass of `rows` rows."""
    return SPLIT_BLOCKS_FEW if rows <= FEW_ROWS else SPLIT_BLOCKS_MANY


def _scale_strides(layer: Layer) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    if layer.key_scales is None:  # unused by the kernel; any tensor with the right rank
        return layer.keys, layer.values, (0, 0, 0)
    return layer.key_scales, layer.value_scales, tuple(layer.key_scales.stride())


def _counts(device: torch.device, needed: int) -> torch.Tensor:
    """The decode kernel's zeroed per-(row, head) split counters on `device`, at least `needed`.

    The kernel leaves them at 0, so one buffer serves every layer, step and captured graph. A
    larger one is added beside the old (never replacing it: captured graphs still read it); the
    engine's warm-up passes reach the largest batch before any graph is captured.
    """
    buffers = _COUNTS.setdefault(str(device), [])
    if not buffers or buffers[-1].numel() < needed:
        buffers.append(torch.zeros(max(needed, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


_COUNTS: dict[str, list[torch.Tensor]] = {}


def decode(
    q: torch.Tensor, layer: Layer, tables: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D], row b over its first `lengths[b]` positions.

    tables: [B, W] int32 block tables; lengths: [B] int32 (0 for a padding row: output 0).
    One kernel: each (row, head)'s last split to finish merges the splits' partial results.
    """
    rows, q_heads, dim = q.shape
    block_size, kv_heads = layer.keys.shape[1], layer.keys.shape[2]
    dp = triton.next_power_of_2(dim)
    split = split_blocks(rows)
    splits = triton.cdiv(tables.shape[1], split)
    acc = torch.empty(rows, q_heads, splits, dp, dtype=torch.float32, device=q.device)
    maxes = torch.empty(rows, q_heads, splits, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    out = torch.empty_like(q)
    key_scales, value_scales, scale_strides = _scale_strides(layer)
    _decode[(rows, q_heads, splits)](
        q, layer.keys, layer.values, key_scales, value_scales, tables, lengths,
        acc, maxes, sums, _counts(q.device, rows * q_heads), out,
        scale,
        q.stride(0), q.stride(1),
        layer.keys.stride(0), layer.keys.stride(1), layer.keys.stride(2),
        *scale_strides,
        tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        maxes.stride(0), maxes.stride(1),
        out.stride(0), out.stride(1),
        GROUP=q_heads // kv_heads, BLOCK=block_size, D=dim, DP=dp,
        SPLIT=split, SP=triton.next_power_of_2(splits), PER=BLOCKS_PER_STEP,
        QUANT=layer.quantized,
    )  # fmt: skip
    return out


def prefill(
    q: torch.Tensor,
    layer: Layer,
    tables: torch.Tensor,
    query_start: torch.Tensor,
    lengths: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    *,
    tile: int,
) -> torch.Tensor:
    """q [N, Hq, D] (packed chunks) -> [N, Hq, D], causal within each sequence.

    Sequence s owns query rows query_start[s]:query_start[s + 1], the last of its lengths[s]
    positions; tiles [n, 2] int32 lists (sequence, first row in its chunk) per `tile` rows.
    """
    tokens, q_heads, dim = q.shape
    block_size, kv_heads = layer.keys.shape[1], layer.keys.shape[2]
    dp = max(triton.next_power_of_2(dim), 16)
    out = torch.empty_like(q)
    key_scales, value_scales, scale_strides = _scale_strides(layer)
    _prefill[(tiles.shape[0], q_heads)](
        q, layer.keys, layer.values, key_scales, value_scales, tables, query_start,
        lengths, tiles, out,
        scale,
        q.stride(0), q.stride(1),
        layer.keys.stride(0), layer.keys.stride(1), layer.keys.stride(2),
        *scale_strides,
        tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=q_heads // kv_heads, BLOCK=block_size, D=dim, DP=dp,
        TILE=tile, QUANT=layer.quantized,
        # float32 models get float32 products (tl.dot would use TF32 on Ampere and newer).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out


@triton.jit
def _rope_write(
    QKV, COS, SIN, SLOTS, QOUT, K, V,
    stride_x, stride_c, stride_ot, stride_oh, stride_kt, stride_kh,
    QH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    HP: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    head = tl.program_id(1)  # query heads first, then key heads (each with its value head)
    half = tl.arange(0, HP)
    ok = half < HALF
    trig = token * stride_c
    c1 = tl.load(COS + trig + half, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + trig + HALF + half, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + trig + half, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + trig + HALF + half, mask=ok, other=0.0).to(tl.float32)
    row = QKV + token * stride_x
    x1 = tl.load(row + head * D + half, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + head * D + HALF + half, mask=ok, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): transformers' rotary.
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if head < QH:
        out = QOUT + token * stride_ot + head * stride_oh
        tl.store(out + half, o1.to(QOUT.dtype.element_ty), mask=ok)
        tl.store(out + HALF + half, o2.to(QOUT.dtype.element_ty), mask=ok)
    else:
        kv_head = head - QH
        at = tl.load(SLOTS + token) * stride_kt + kv_head * stride_kh  # 64-bit: big pools
        tl.store(K + at + half, o1.to(K.dtype.element_ty), mask=ok)
        tl.store(K + at + HALF + half, o2.to(K.dtype.element_ty), mask=ok)
        value = row + (QH + KVH + kv_head) * D
        v1 = tl.load(value + half, mask=ok, other=0.0)
        v2 = tl.load(value + HALF + half, mask=ok, other=0.0)
        tl.store(V + at + half, v1.to(V.dtype.element_ty), mask=ok)
        tl.store(V + at + HALF + half, v2.to(V.dtype.element_ty), mask=ok)


def rope_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    layer: Layer,
    q_heads: int,
) -> torch.Tensor:
    """One kernel for what took five: rotary on the queries and keys of a fused q/k/v
    projection's output, the keys and values stored straight into the pool at `slots`.

    qkv: [N, (q_heads + 2 * kv_heads) * D] (rows contiguous); cos, sin: [N, D]; slots: [N].
    Returns the rotated queries [N, q_heads, D]. Computes in float32, rounds once.
    """
    tokens = qkv.shape[0]
    kv_heads, dim = layer.keys.shape[2], layer.keys.shape[3]
    if dim % 2 or qkv.shape[1] != (q_heads + 2 * kv_heads) * dim or qkv.stride(1) != 1:
        raise ValueError(f"rope_write: a q/k/v row of {qkv.shape[1]} for heads of {dim}")
    keys = layer.keys.view(-1, kv_heads, dim)
    values = layer.values.view(-1, kv_heads, dim)
    q = torch.empty(tokens, q_heads, dim, dtype=qkv.dtype, device=qkv.device)
    _rope_write[(tokens, q_heads + kv_heads)](
        qkv, cos, sin, slots, q, keys, values,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        QH=q_heads, KVH=kv_heads, D=dim, HALF=dim // 2, HP=triton.next_power_of_2(dim // 2),
    )  # fmt: skip
    return q


def check_rope_write(
    q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """None when `rope_write` does on this device what transformers' rotary and a scatter into
    the pool do (three tokens of random values, the model's head counts); else what went wrong.
    Run once at load: a kernel that cannot compile or computes wrong here is not used."""
    gen = torch.Generator().manual_seed(0)
    tokens, block = 3, 16
    width = (q_heads + 2 * kv_heads) * dim
    qkv = torch.randn(tokens, width, generator=gen).to(device, dtype)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    pool = torch.zeros(3, block, kv_heads, dim, dtype=dtype, device=device)
    layer = Layer(keys=pool, values=pool.clone())
    slots = torch.tensor([17, 3, 46], device=device)
    try:
        q = rope_write(qkv, cos, sin, slots, layer, q_heads)
    except Exception as exc:  # a compile or launch failure on this GPU: report, don't serve it
        return f"{type(exc).__name__}: {exc}"
    x, c, s = qkv.float(), cos.float()[:, None], sin.float()[:, None]
    heads = x.view(tokens, q_heads + 2 * kv_heads, dim)
    first, second = heads.chunk(2, dim=-1)
    rotated = heads * c + torch.cat([-second, first], dim=-1) * s
    want = {
        "queries": rotated[:, :q_heads],
        "keys": rotated[:, q_heads : q_heads + kv_heads],
        "values": heads[:, q_heads + kv_heads :],
    }
    got = {
        "queries": q.float(),
        "keys": layer.keys.view(-1, kv_heads, dim)[slots].float(),
        "values": layer.values.view(-1, kv_heads, dim)[slots].float(),
    }
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, expected in want.items():
        if not torch.allclose(got[name], expected, atol=tolerance, rtol=tolerance):
            worst = (got[name] - expected).abs().max().item()
            return f"its {name} differ from the reference by up to {worst:.3g}"
    return None
