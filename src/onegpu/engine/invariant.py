"""Batch invariance (`--deterministic`): every token's numbers independent of what shares its pass.

A greedy answer can change with its neighbours because a matrix product's reduction order, in
BLAS and in GPU libraries alike, depends on how many rows the product has: one request alone runs
its projections on 1 row, among 30 on 30, and the last bits of a logit differ. Where two tokens
are nearly tied, so does the answer. Here every projection of the model is made to compute each
row the same way whatever the row count:

- on the CPU, the rows are padded with zeros to a multiple of `ROW_TILE`: the BLAS then computes
  each row with the same kernel and the same order (measured on every shape of Qwen2.5-0.5B, for
  1 to 2,049 rows; `tests/engine/test_invariant.py` holds that property on this machine). On
  some AVX-512 CPUs MKL still picks its kernel by row count (a Xeon with AVX-512 IFMA and VBMI:
  rows 9-16 of a 896 x 4864 product came out unlike 8, and from 113 rows another kernel again)
  unless its strict reproducibility is on (`MKL_STRICT`, which `onegpu serve --deterministic`
  sets); the model's own shapes are probed at load, and a BLAS that fails is a clear error;
- on CUDA, projections run on Triton kernels with one tile shape per weight, whatever the rows
  (`invariant_kernels.py`).

Attention is made invariant too (`attention.py`: each query over exactly its own positions on the
CPU; decode through the prefill kernel on CUDA), so a position's keys, values and logits are a
function of the tokens before it only: alone or among 30, cached or recomputed, whatever chunk it
was prefilled in. Norms, rotary and sampling already work row by row.
"""

from __future__ import annotations

import functools
import gc
import logging

import torch
import torch.nn.functional as F

from onegpu.engine.gptq_layers import is_gptq
from onegpu.errors import UserError

log = logging.getLogger(__name__)

# Rows a CPU projection is padded to a multiple of.
ROW_TILE = 8
# MKL's conditional numerical reproducibility, strict: the same kernel and order for a row
# whatever the row count. MKL reads it once, at its first call, so it must be in the
# environment before anything multiplies. On the Xeon above it cost nothing past 8 rows (64 x
# 896 x 4864: 4.8 -> 3.8 ms; one unpadded row, which this mode never runs, 0.38 -> 0.79 ms).
MKL_STRICT = ("MKL_CBWR", "AUTO,STRICT")
# Row counts probed: one tile, the next ones, and past the point where MKL was seen to switch.
PROBED_ROWS = (1, 9, 17, 113, 257)


class DeterminismError(UserError):
    """The model cannot be served batch-invariant here (a missing kernel, an act-order layer)."""


class PaddedRows(torch.nn.Module):
    """`inner` (a projection over the last dim) run on rows padded to a multiple of ROW_TILE."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # [N, K]
        missing = -rows.shape[0] % ROW_TILE
        if missing:
            rows = F.pad(rows, (0, 0, 0, missing))
        out = self.inner(rows)[: rows.shape[0] - missing]  # [N, out]
        return out.reshape(*shape[:-1], out.shape[-1])

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)  # in_features, weight, ...


def _row_wise_norms(model: torch.nn.Module) -> None:
    """On CUDA, every RMSNorm runs Liger's kernel, one program per row (torch's own reduction
    kernels choose their split of a row by the number of rows)."""
    from onegpu.engine.fusion import LigerOps, pick_ops

    if pick_ops(torch.device("cuda")) is not LigerOps:
        raise DeterminismError(
            "--deterministic on CUDA needs liger-kernel for its row-wise norms: "
            "pip install 'onegpu[cuda]'"
        )
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(LigerOps.rms_norm, norm=module)


def is_projection(module: torch.nn.Module) -> bool:
    """A module that multiplies its input's last dim by a weight: Linear or a GPTQ layer."""
    return type(module) is torch.nn.Linear or is_gptq(module)


def rows_computed_alike(
    in_features: int, out_features: int, *, linear=F.linear, rows: tuple[int, ...] = PROBED_ROWS
) -> bool:
    """Whether `linear` here gives a row of an [N, in] x [in, out] product padded to ROW_TILE
    the same bits whatever N (probed on random numbers, for each of `rows`)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(max(rows), in_features, generator=generator)
    padded = PaddedRows(lambda t: linear(t, weight))
    first = padded(x[:1])[0]
    return all(torch.equal(padded(x[:n])[0], first) for n in rows)


def _check_blas(model: torch.nn.Module) -> None:
    """Raise DeterminismError unless this process's BLAS computes padded rows alike on each
    projection shape of `model`."""
    shapes = {(m.in_features, m.out_features) for m in model.modules() if is_projection(m)}
    for in_features, out_features in sorted(shapes):
        if not rows_computed_alike(in_features, out_features):
            name, value = MKL_STRICT
            raise DeterminismError(
                f"--deterministic on the CPU: this BLAS computes a row of a {in_features} x "
                f"{out_features} projection differently depending on how many rows share it; "
                f"start the process with {name}={value} in its environment (onegpu serve "
                f"--deterministic sets it; MKL reads it at its first call)"
            )


def make_invariant(model: torch.nn.Module) -> int:
    """Swap every projection of `model` for its batch-invariant form, in place; how many.

    Idempotent: projections already swapped are left as they are.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        from onegpu.engine.invariant_kernels import invariant_projection

        wrap = invariant_projection
        _row_wise_norms(model)
    else:
        _check_blas(model)
        wrap = PaddedRows
    swapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, PaddedRows):
            continue
        for name, child in list(parent.named_children()):
            if is_projection(child):
                try:
                    setattr(parent, name, wrap(child))
                except ValueError as exc:  # a layer the invariant kernels cannot compute
                    raise DeterminismError(str(exc)) from None
                swapped += 1
    if device.type == "cuda":
        gc.collect()  # the replaced GPTQ layers hold a reference to themselves
        torch.cuda.empty_cache()
    log.warning("deterministic: %d projections made batch-invariant (%s)", swapped, device.type)
    return swapped
