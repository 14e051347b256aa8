"""Log-probabilities reported to the caller: the model's raw log-softmax, never warped scores."""

from __future__ import annotations

import math

import torch

# Floor for log-probabilities of tokens the model deems impossible (or that came out NaN):
# JSON cannot carry -inf/NaN (Starlette refuses them, a 500 for the client).
LOGPROB_FLOOR = -1e4


def gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score `targets` under `logits`, and list the `k` most likely tokens at each position.

    logits: [T, V] raw model output; targets: [T] token ids.
    Returns (chosen [T], top_values [T, k], top_ids [T, k]), float32 on the CPU, all finite.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    logp = torch.nan_to_num(logp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_min(LOGPROB_FLOOR)
    chosen = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [T]
    top_values, top_ids = torch.topk(logp, k=min(k, logp.shape[-1]), dim=-1)  # [T, k]
    return chosen.cpu(), top_values.cpu(), top_ids.cpu()


def finite(value: float) -> float:
    """A JSON-safe float: NaN and -inf become LOGPROB_FLOOR, +inf becomes 0."""
    if math.isnan(value) or value == float("-inf"):
        return LOGPROB_FLOOR
    if value == float("inf"):
        return 0.0
    return max(float(value), LOGPROB_FLOOR)
