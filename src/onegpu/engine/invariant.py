"""Batch invariance (`--deterministic`): every token's numbers independent of what shares its pass.

A greedy answer can change with its neighbours because a matrix product's reduction order, in
BLAS and in GPU libraries alike, depends on how many rows the product has: one request alone runs
its projections on 1 row, among 30 on 30, and the last bits of a logit differ. Where two tokens
are nearly tied, so does the answer. Here every projection of the model is made to compute each
row the same way whatever the row count:

- on the CPU, the rows are padded with zeros to a multiple of `ROW_TILE`: the BLAS then computes
  each row with the same kernel and the same order (measured on every shape of Qwen2.5-0.5B, for
  1 to 2,049 rows; `tests/engine/test_invariant.py` holds that property on this machine);
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
