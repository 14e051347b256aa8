"""Log-probabilities reported to the caller: the model's raw log-softmax, never warped scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Floor for log-probabilities of tokens the model deems impossible (or that came out NaN):
# JSON cannot carry -inf/NaN (Starlette refuses them, a 500 for the client).
LOGPROB_FLOOR = -1e4


@dataclass(frozen=True, slots=True)
class Gathered:
    """Scores of T positions, on the CPU: the targets, their logprobs, the k best per position."""

    targets: torch.Tensor  # [T] long
    chosen: torch.Tensor  # [T] float32
    top_values: torch.Tensor  # [T, k] float32, best first
    top_ids: torch.Tensor  # [T, k] long


def gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, k: int, *, invariant: bool = False
) -> Gathered:
    """Score `targets` under `logits`, and list the `k` most likely tokens at each position.

    logits: [T, V] raw model output; targets: [T] token ids (on the logits' device or not).
    Everything is computed where the logits are and copied to the host in one transfer. All
    values are finite. `invariant`: each row's numbers do not depend on the other rows
    (--deterministic; on CUDA, a Triton kernel per row).
    """
    return unpack(pack_logprobs(logits, targets, k, invariant=invariant).cpu())


def pack_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, k: int, *, invariant: bool = False
) -> torch.Tensor:
    """`gather_logprobs`'s numbers where the logits are, not yet copied: [T, 2 + 2 * k'] of
    float64 (k' = k, or the vocabulary if smaller), read by `unpack`. Launches kernels only,
    never waits for the device."""
    if invariant and logits.is_cuda:
        from onegpu.engine.invariant_kernels import log_softmax

        logp = log_softmax(logits)  # [T, V]
    else:
        logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    logp = torch.nan_to_num(logp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_min(LOGPROB_FLOOR)
    targets = targets.to(logp.device).long()
    chosen = logp.gather(-1, targets.unsqueeze(-1))  # [T, 1]
    # HELM's usual ask, one alternative: one reduction (a top-k over the vocabulary was 15 kernels)
    if k == 1:
        top_values, top_ids = logp.max(dim=-1, keepdim=True)  # [T, 1]
    else:
        top_values, top_ids = torch.topk(logp, k=min(k, logp.shape[-1]), dim=-1)  # [T, k]
    # float64 holds both the float32 values and the ids exactly: one copy for all four.
    return torch.cat(
        [targets[:, None].double(), chosen.double(), top_values.double(), top_ids.double()], 1
    )


def unpack(packed: torch.Tensor) -> Gathered:
    """`pack_logprobs`'s numbers, on the host, as a `Gathered`."""
    width = (packed.shape[-1] - 2) // 2
    return Gathered(
        targets=packed[:, 0].long(),
        chosen=packed[:, 1].float(),
        top_values=packed[:, 2 : 2 + width].float(),
        top_ids=packed[:, 2 + width :].long(),
    )


def finite(value: float) -> float:
    """A JSON-safe float: NaN and -inf become LOGPROB_FLOOR, +inf becomes 0."""
    if math.isnan(value) or value == float("-inf"):
        return LOGPROB_FLOOR
    if value == float("inf"):
        return 0.0
    return max(float(value), LOGPROB_FLOOR)
