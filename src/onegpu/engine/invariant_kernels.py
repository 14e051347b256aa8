"""Batch-invariant projections on CUDA: Triton GEMMs whose tiling depends on the weight only.

cuBLAS and Marlin pick their kernel, tile and split of the reduction by the number of rows, so a
row's result changes with what shares its pass (Marlin's own issue tracker shows it). These
kernels take one tile shape per weight (`columns_for`), never split the reduction, and sum every
output element over the same K-blocks in the same order, whatever M is. Rows run in tiles of
BLOCK_M; a tile's rows never mix.

- `dense`: x [M, K] @ weight [N, K]^T (+ bias), fp16/bf16, for plain Linear layers and lm_head.
- `log_softmax`: one program per row (torch's kernel is not row-invariant on an H100).
- `gptq`: the same with GPTQ-packed weights (4 or 8 bits, symmetric or not, no act-order):
  qweight [K * bits / 32, N] int32, qzeros [K / group, N * bits / 32] int32 (zero points as
  stored by GPTQModel's torch kernel, the "v2" format), scales [K / group, N]. Each K-block lies
  in one group: its integer weights (q - zero, exact in fp16) go through the tensor cores and the
  group's scale multiplies the block's fp32 partial product.

Padding rows (zeros) and rows of other requests only share a tile's memory traffic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from onegpu.device import cuda_index

# Rows per tile, and reduction step (smaller for GPTQ groups under 64): the same for every
# weight. Output columns per tile (`columns_for`) are fixed per weight shape.
BLOCK_M = 64
BLOCK_K = 64


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def columns_for(n: int, device: int) -> int:
    """Output columns per tile of an N-wide weight on this GPU: the widest tile that still gives
    two programs per SM at a few rows (decode streams weights; idle SMs would waste bandwidth)."""
    for columns in (64, 32):
        if triton.cdiv(n, columns) >= 2 * _sm_count(device):
            return columns
    return 16


@triton.jit
def _matmul(
    X, W, QZ, S, B, OUT,
    M, N, K,
    stride_xm, stride_wk, stride_wn, stride_zg, stride_sg, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # Row tiles vary fastest: programs side by side read the same weight columns (L2 reuse).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for start in range(0, K, BK):  # every element: the same blocks, in the same order
        ks = start + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(
            X + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BM, BK]
        if QUANT:
            PACK: tl.constexpr = 32 // BITS
            MASK: tl.constexpr = (1 << BITS) - 1
            packed = tl.load(
                W + (ks // PACK)[:, None].to(tl.int64) * stride_wk + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0,
            )  # [BK, BN] int32 (PACK neighbours in K read the same word)
            q = (packed >> ((ks % PACK) * BITS)[:, None]) & MASK
            group = start // GROUP  # a block never straddles two groups
            zeros = tl.load(QZ + group * stride_zg + cols // PACK, mask=col_ok, other=0)
            zeros = (zeros >> ((cols % PACK) * BITS)) & MASK
            w = (q - zeros[None, :]).to(x.dtype)  # small integers: exact in fp16 and bf16
            scale = tl.load(S + group * stride_sg + cols, mask=col_ok, other=0.0)
            acc += tl.dot(x, w) * scale.to(tl.float32)[None, :]
        else:
            w = tl.load(
                W + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # [BK, BN]: the weight [N, K] read as its transpose
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        OUT + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _run(x, weight, n, *, bias, qzeros=None, scales=None, bits=16, group=BLOCK_K):
    rows, k = x.shape
    columns = columns_for(n, cuda_index(x.device)) if x.is_cuda else 16
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    quant = qzeros is not None
    _matmul[(triton.cdiv(rows, BLOCK_M), triton.cdiv(n, columns))](
        x, weight, qzeros if quant else weight, scales if quant else weight,
        bias if bias is not None else weight, out,
        rows, n, k,
        x.stride(0),
        weight.stride(0) if quant else 0,  # qweight [K / PACK, N]
        0 if quant else weight.stride(0),  # weight [N, K]
        qzeros.stride(0) if quant else 0, scales.stride(0) if quant else 0,
        out.stride(0),
        BITS=bits, GROUP=group, QUANT=quant, HAS_BIAS=bias is not None,
        BM=BLOCK_M, BN=columns, BK=min(BLOCK_K, group),  # a K-block lies in one group
    )  # fmt: skip
    return out


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias -> [M, N], each row computed alike for any M."""
    return _run(x.contiguous(), weight.contiguous(), weight.shape[0], bias=bias)


def gptq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x [M, K] @ the GPTQ weight it packs (see the module docstring) + bias -> [M, N]."""
    if group_size % 16 or (group_size < BLOCK_K and BLOCK_K % group_size):
        raise ValueError(f"--deterministic: GPTQ group size {group_size} is not supported")
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    return _run(
        x.contiguous(), qweight, qweight.shape[1], bias=bias, qzeros=qzeros, scales=scales,
        bits=bits, group=group_size,
    )  # fmt: skip


@triton.jit
def _log_softmax(X, OUT, V, stride_x, stride_o, BLOCK: tl.constexpr):
    # One program per row, its blocks in order: a row's numbers never depend on other rows
    # (torch's own kernel gave a row different last bits in a batch of 2 than alone).
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf"))
        top = tl.maximum(top, x.to(tl.float32))
    peak = tl.max(top, axis=0)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf"))
        total += tl.exp(x.to(tl.float32) - peak)
    norm = peak + tl.log(tl.sum(total, axis=0))
    for start in range(0, V, BLOCK):
        x = tl.load(X + row * stride_x + start + lanes, mask=start + lanes < V, other=0.0)
        tl.store(
            OUT + row * stride_o + start + lanes, x.to(tl.float32) - norm, mask=start + lanes < V
        )


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [T, V] -> float32 log-softmax [T, V], each row computed alike whatever T."""
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _log_softmax[(logits.shape[0],)](
        logits, out, logits.shape[1], logits.stride(0), out.stride(0), BLOCK=4096
    )
    return out


class InvariantLinear(torch.nn.Module):
    """A Linear computed by `dense`."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return dense(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)


class InvariantGPTQ(torch.nn.Module):
    """A GPTQModel layer (torch kernel, v2 zero points, no act-order) computed by `gptq`."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        g_idx = layer.g_idx.to("cpu")
        group = layer.group_size if layer.group_size > 0 else layer.in_features
        if not torch.equal(g_idx, torch.arange(layer.in_features) // group):
            raise ValueError(
                "--deterministic: act-order (desc_act) GPTQ checkpoints have no batch-invariant "
                "kernel; quantize without --desc-act"
            )
        format_of = getattr(layer, "qzero_format", None)
        if format_of is not None and format_of() != 2:
            raise ValueError("--deterministic: GPTQ layers must be loaded with the torch kernel")
        self.qweight, self.qzeros, self.scales = layer.qweight, layer.qzeros, layer.scales
        self.bias = layer.bias
        self.bits, self.group_size = layer.bits, group
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = gptq(
            rows, self.qweight, self.qzeros, self.scales, self.bias,
            bits=self.bits, group_size=self.group_size,
        )  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)


def invariant_projection(module: torch.nn.Module) -> torch.nn.Module:
    """The batch-invariant form of a Linear or a GPTQ layer."""
    if type(module) is torch.nn.Linear:
        return InvariantLinear(module)
    return InvariantGPTQ(module)
