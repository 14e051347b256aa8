"""Choosing the next token from one row of logits: greedy, or temperature / top-k / top-p sampling.

Logprobs are never computed from what these functions return: they only pick the token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from onegpu.engine.types import GREEDY_TEMPERATURE

# Above this, sampling is already uniform over the surviving tokens; a larger divisor would
# overflow float32 to inf, and -inf (a suppressed token) / inf is NaN.
MAX_TEMPERATURE = 1e4


def suppress(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """`logits` [V] with `token_ids` made impossible (end-of-text before min_new_tokens)."""
    ids = [i for i in token_ids if 0 <= i < logits.shape[-1]]
    if not ids:
        return logits
    out = logits.clone()
    out[ids] = float("-inf")
    return out


def warp(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of one row of logits [V].

    `top_k <= 0` or `>= V` and `top_p >= 1` disable their filter. At least one token always
    survives, so the result can be sampled from.
    """
    scores = logits.float() / min(temperature, MAX_TEMPERATURE)  # [V]
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)  # [V]
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def pick(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token id from one row of raw logits [V], as a 0-d tensor on their device.

    Temperatures at or below GREEDY_TEMPERATURE (HELM sends 1e-7 for 0) take the argmax: dividing
    by 1e-7 would overflow to inf and sampling would then be arbitrary. Nothing waits for the
    device here: the batch's choices are read back together.
    """
    if temperature <= GREEDY_TEMPERATURE:
        return torch.argmax(logits)
    probs = torch.softmax(warp(logits, temperature=temperature, top_k=top_k, top_p=top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
