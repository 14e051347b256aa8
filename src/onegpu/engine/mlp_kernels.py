"""SiLU-and-multiply over a fused gate|up projection (CUDA; the Triton interpreter on a CPU).

Liger's kernel runs one program per row: at one decode row the 13,696 columns of Qwen-14B's MLP
are one program on one SM (3.0 us a layer on an H100, 40 launches a step). Here programs tile
each row's columns, so a single row spreads over the GPU: 1.4 us a layer (56.7 against Liger's
121.0 us a step, H100, one call). The arithmetic is Liger's: the gate's SiLU in float32, rounded
to the activation dtype, times `up` in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per program: 14 programs for one row of Qwen-14B's MLP, 4 warps of 8 values each.
COLUMNS = 1024


@triton.jit
def _silu_mul(GU, OUT, N, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(GU + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_in + N + cols, mask=ok, other=0.0)
    out = (gate * tl.sigmoid(gate)).to(up.dtype) * up
    tl.store(OUT + row * stride_out + cols, out, mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * F] (gate, then up) -> [..., F] = silu(gate) * up."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"silu_mul: a gate|up row of odd width {width}")
    features = width // 2
    rows = gate_up.reshape(-1, width)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], features, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0]:
        _silu_mul[(rows.shape[0], triton.cdiv(features, COLUMNS))](
            rows, out, features, rows.stride(0), out.stride(0), BLOCK=COLUMNS
        )
    return out.view(*gate_up.shape[:-1], features)
