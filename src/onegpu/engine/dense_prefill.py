"""Large prefill passes through cuBLAS: each Marlin layer's 8-bit weight dequantized to fp16 once
per pass, into one buffer shared by every layer.

Marlin reads the 8-bit weight once per 64 rows of activations and runs its tensor-core tiles at
well under cuBLAS's rate on large inputs (H100, 14B-shaped layers, 2,048 rows: q/k/v 0.98 ms
against 0.43 with fp16 weights, gate/up 1.79 against 0.75). A pass of that size pays the
dequantization (one read of the 8-bit weight, one fp16 write) and wins the rest: a 2,048-token
chunk of the 14B took 129.7 ms instead of 219.0. A decode step (a few rows) stays on Marlin,
which reads the weight once in all.

Marlin's tile order is read from GPTQModel's own repack at load (`read_layout`: pack weights that
name their row and column, repack them, see where each went), not written down here, and every
layer shape is checked against Marlin's own output before it is served: a GPTQModel whose layout
changes is served by Marlin alone, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType

import torch
import triton
import triton.language as tl

from onegpu.engine.config import DENSE_MIN_ROWS
from onegpu.engine.gptq_layers import is_gptq

log = logging.getLogger(__name__)

# Marlin's tile: 16 input rows x 64 output columns, 1,024 bytes in 256 int32 of one repacked row.
TILE_K, TILE_N = 16, 64
TILE_BYTES = TILE_K * TILE_N
# The probe: 2 x 2 tiles, enough to see that every tile is laid out alike. Its codes name their
# row (< 32) or their column (< 128) in one byte.
PROBE_K, PROBE_N = 2 * TILE_K, 2 * TILE_N
# Rows of activations the load-time check multiplies (Marlin's own kernel at this size).
CHECK_ROWS = 64


@dataclass(frozen=True, slots=True)
class Layout:
    """Where Marlin keeps an 8-bit weight: tile (r, u) (input rows 16r.., output columns 64u..)
    fills int32 256u.. 256u + 255 of repacked row r, weight (k, n) of the tile at byte
    `byte_of[k, n]` (4 bytes per int32, low first); the tile's 64 scales are stored in an order,
    the scale of its column n at `scale_of[n]`."""

    byte_of: torch.Tensor  # [16, 64] int32, a permutation of 0..1023
    scale_of: torch.Tensor  # [64] int32, a permutation of 0..63


def gptq_pack(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes [K, N] (0..255) packed as GPTQ checkpoints hold them: [K / 4, N] int32, the
    code of row k in byte k % 4 of word k // 4."""
    words = codes.to(torch.int64).reshape(-1, 4, codes.shape[1])
    shifts = torch.arange(0, 32, 8, device=codes.device)[None, :, None]
    packed = (words << shifts).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def word_bytes(words: torch.Tensor) -> torch.Tensor:
    """The bytes of int32 `words` [R, C], low first: [R, 4C] int64."""
    shifts = torch.arange(0, 32, 8, device=words.device)
    return ((words.to(torch.int64)[..., None] >> shifts) & 0xFF).flatten(-2)


def read_layout(
    repack: Callable[[torch.Tensor, int, int], torch.Tensor],
    permute_scales: Callable[[torch.Tensor, int, int], torch.Tensor],
    device: torch.device,
) -> Layout | str:
    """Marlin's layout as `repack` (GPTQ-packed [K/4, N] int32, K, N -> Marlin's int32) and
    `permute_scales` ([groups, N], K, N -> Marlin's order; grouped and per-channel scales have
    orders of their own) produce it; or why it is not one this module reads (tiles laid out
    differently from one another, codes changed by the repack)."""
    rows = torch.arange(PROBE_K, device=device)[:, None].expand(PROBE_K, PROBE_N)
    cols = torch.arange(PROBE_N, device=device)[None, :].expand(PROBE_K, PROBE_N)
    got_rows, got_cols = (word_bytes(repack(gptq_pack(c), PROBE_K, PROBE_N)) for c in (rows, cols))
    want_shape = (PROBE_K // TILE_K, PROBE_N * TILE_K)
    if got_rows.shape != want_shape:
        return f"a {PROBE_K} x {PROBE_N} weight repacked to {tuple(got_rows.shape)} bytes"
    byte_of = None
    for r in range(want_shape[0]):
        for u in range(PROBE_N // TILE_N):
            tile_rows = got_rows[r, u * TILE_BYTES : (u + 1) * TILE_BYTES] - r * TILE_K
            tile_cols = got_cols[r, u * TILE_BYTES : (u + 1) * TILE_BYTES] - u * TILE_N
            inside = (tile_rows >= 0) & (tile_rows < TILE_K) & (tile_cols >= 0)
            if not bool((inside & (tile_cols < TILE_N)).all()):
                return f"tile ({r}, {u}) holds weights of other tiles"
            here = torch.full((TILE_K * TILE_N,), -1, dtype=torch.int64, device=device)
            here[tile_rows * TILE_N + tile_cols] = torch.arange(TILE_BYTES, device=device)
            if bool((here < 0).any()):
                return f"tile ({r}, {u}) holds some weight twice"
            if byte_of is not None and not torch.equal(here, byte_of):
                return "tiles are laid out differently from one another"
            byte_of = here
    groups = torch.arange(PROBE_N, device=device, dtype=torch.float32).repeat(2, 1)
    moved = permute_scales(groups, PROBE_K, PROBE_N).to(torch.int64)  # [2, N]: source columns
    scale_of = torch.argsort(moved[0, :TILE_N])
    for u in range(PROBE_N // TILE_N):
        tile = moved[:, u * TILE_N : (u + 1) * TILE_N] - u * TILE_N
        if not bool((tile[:, scale_of] == torch.arange(TILE_N, device=device)).all()):
            return "scales are ordered differently from tile to tile"
    return Layout(byte_of.view(TILE_K, TILE_N).to(torch.int32), scale_of.to(torch.int32))


@triton.jit
def _dequantize(
    Q, S, BYTE_OF, SCALE_OF, W,
    n, group_rows,
    TILES: tl.constexpr, OFFSET: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)  # input rows 16r .. 16r + 15
    first = tl.program_id(1) * TILES  # output tiles (64 columns each) of this program
    k = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 64)[None, :]
    at = tl.load(BYTE_OF + k * 64 + c)  # [16, 64] byte in the tile
    shift = (at % 4) * 8
    scale_at = tl.load(SCALE_OF + tl.arange(0, 64))
    group = (r * 16) // group_rows
    for t in tl.static_range(TILES):
        tile = first + t
        words = tl.load(Q + r * n * 4 + tile * 256 + at // 4)
        code = (words >> shift) & 0xFF
        scale = tl.load(S + group * n + tile * 64 + scale_at).to(tl.float32)
        weight = (code - OFFSET).to(tl.float32) * scale[None, :]
        tl.store(W + (r * 16 + k) * n + tile * 64 + c, weight.to(W.dtype.element_ty))


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    layout: Layout,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """`out` [K, N] (scales' dtype) = (code - 128) x scale of a symmetric 8-bit weight in Marlin's
    layout: qweight [K / 16, 4N] int32, scales [groups, N] in Marlin's order."""
    k, n = out.shape
    if qweight.shape != (k // TILE_K, 4 * n) or k % TILE_K or n % TILE_N:
        raise ValueError(f"dequantize: a Marlin qweight {tuple(qweight.shape)} for {k} x {n}")
    tiles = next(t for t in (4, 2, 1) if (n // TILE_N) % t == 0)
    grid = (k // TILE_K, n // TILE_N // tiles)
    _dequantize[grid](
        qweight, scales, layout.byte_of, layout.scale_of, out,
        n, group_size if group_size > 0 else k,
        TILES=tiles, OFFSET=128,
    )  # fmt: skip
    return out


# -- serving ---------------------------------------------------------------------------------------


def _servable(module: torch.nn.Module) -> bool:
    """A GPTQModel Marlin layer this module can dequantize: 8-bit symmetric, no act-order, no
    padding, no GPTQModel adapter."""
    return (
        is_gptq(module)
        and type(module).__name__ == "MarlinLinear"
        and module.bits == 8
        and module.sym
        and not module.desc_act
        and getattr(module, "_marlin_tile_padding", None) is None
        and not getattr(module, "adapter", None)
    )


def _group_size(module) -> int:
    group = module.requested_group_size
    return -1 if group in (-1, module.in_features) else group


class DenseWeights:
    """One fp16 buffer as large as the largest layer's weight, which a large pass's layers
    dequantize into in turn (a layer's GEMM consumes it before the next layer writes it)."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty(size, dtype=dtype, device=device)
        self.min_rows = DENSE_MIN_ROWS

    def weight(self, module) -> torch.Tensor:
        """`module`'s weight [in, out] in the shared buffer."""
        out = self.buffer[: module.in_features * module.out_features]
        out = out.view(module.in_features, module.out_features)
        layout, group = module.onegpu_layout, _group_size(module)
        return dequantize(module.qweight, module.scales, layout, group, out)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    dense = self.onegpu_dense
    if x.numel() < dense.min_rows * x.shape[-1]:
        return self.onegpu_marlin(x)
    flat = x.reshape(-1, x.shape[-1])
    weight = dense.weight(self)
    bias = self.onegpu_bias
    out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


def _plain_bias(module, device: torch.device) -> torch.Tensor | None:
    """The layer's bias in output order (Marlin keeps it in its own)."""
    if module.bias is None:
        return None
    from gptqmodel.utils.marlin import marlin_permute_bias

    n = module.out_features
    sources = marlin_permute_bias(torch.arange(n, device=device, dtype=torch.float32)).long()
    plain = torch.empty_like(module.bias)
    plain[sources] = module.bias
    return plain


def _check(module, dense: DenseWeights) -> str | None:
    """None when the dequantized weight gives Marlin's own output for this layer."""
    gen = torch.Generator(device=module.qweight.device).manual_seed(0)
    x = torch.randn(
        CHECK_ROWS,
        module.in_features,
        generator=gen,
        device=module.qweight.device,
        dtype=module.scales.dtype,
    )
    expected = module.onegpu_marlin(x).float()
    weight = dense.weight(module)
    got = x.float() @ weight.float()
    if module.onegpu_bias is not None:
        got += module.onegpu_bias.float()
    worst = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    if not worst <= 1e-2 * scale:  # fp16 rounding differs; a wrong layout is off by ~100%
        return f"a {module.in_features} x {module.out_features} layer is off by {worst:.3g}"
    return None


def install(model: torch.nn.Module) -> DenseWeights | None:
    """Run `model`'s 8-bit Marlin layers on dequantized weights in passes of at least
    `DenseWeights.min_rows` rows; None (Marlin everywhere, with a warning) when there are none
    or the layout cannot be read or checked."""
    head = model.get_output_embeddings()  # a quantized head: prefill asks it for few rows
    modules = [m for m in model.modules() if _servable(m) and m is not head]
    if not modules:
        return None
    device = modules[0].qweight.device
    from gptqmodel.utils.marlin import gptq_marlin_repack, marlin_permute_scales

    dtype = modules[0].scales.dtype

    def repack(packed, k, n):
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return gptq_marlin_repack(packed, empty, size_k=k, size_n=n, num_bits=8, dtype=dtype)

    layouts: dict[bool, Layout | str] = {}
    for grouped in {_group_size(m) > 0 for m in modules}:
        group = TILE_K if grouped else -1
        try:
            layouts[grouped] = read_layout(
                repack,
                lambda s, k, n, group=group: marlin_permute_scales(s, k, n, group),
                device,
            )
        except Exception as exc:  # the repack op refusing the probe: Marlin alone
            layouts[grouped] = f"{type(exc).__name__}: {exc}"
    problems = [layout for layout in layouts.values() if isinstance(layout, str)]
    if problems:
        log.warning("large prefill passes stay on Marlin: its layout is unread (%s)", problems[0])
        return None
    size = max(m.in_features * m.out_features for m in modules)
    dense = DenseWeights(size, dtype, device)
    checked: dict[tuple, str | None] = {}
    for module in modules:
        module.onegpu_marlin = module.forward
        module.onegpu_bias = _plain_bias(module, device)
        module.onegpu_dense = dense
        module.onegpu_layout = layouts[_group_size(module) > 0]
        shape = (module.in_features, module.out_features, _group_size(module), module.bias is None)
        if shape not in checked:
            checked[shape] = _check(module, dense)
    problems = [p for p in checked.values() if p]
    if problems:
        for module in modules:
            del module.onegpu_marlin, module.onegpu_bias, module.onegpu_dense, module.onegpu_layout
        log.warning("large prefill passes stay on Marlin: %s", problems[0])
        return None
    for module in modules:
        module.forward = MethodType(_forward, module)
    log.warning(
        "passes of >= %d rows: %d Marlin layers dequantized to fp16 for cuBLAS (%.0f MiB buffer)",
        dense.min_rows,
        len(modules),
        dense.buffer.numel() * dense.buffer.element_size() / 2**20,
    )
    return dense
