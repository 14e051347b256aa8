"""Choosing the next tokens from logits: greedy, or temperature / top-k / top-p sampling.

A sampled token is the argmax of its warped scores plus Gumbel noise (the Gumbel-max trick: the
same distribution as drawing from their softmax). The noise of a request's i-th new token comes
from a generator seeded by (the request's seed, i) alone, so which token is drawn depends on the
logits at that position and nothing else: not on the tokens drawn before it in the same pass,
nor on how many positions the pass held. That is what lets a speculative pass verify a sampled
request's draft exactly as a greedy one (a guess is kept while it equals the token drawn there),
and what keeps a seeded answer the same with speculation on or off.

Logprobs are never computed from what these functions return: they only pick the tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

import torch

from onegpu.engine.types import GREEDY_TEMPERATURE

# Above this, sampling is already uniform over the surviving tokens; a larger divisor would
# overflow float32 to inf, and -inf (a suppressed token) / inf is NaN.
MAX_TEMPERATURE = 1e4
_MASK64 = (1 << 64) - 1


def request_seed(seed: int | None) -> int:
    """The seed a sampled request draws with: its own, else a fresh random one."""
    return seed if seed is not None else secrets.randbits(63)


def position_seed(seed: int, index: int) -> int:
    """The generator seed for the `index`-th new token of a request drawn with `seed`: SplitMix64
    of the pair, so neighbouring indices and seeds get unrelated streams."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # 63 bits


def gumbel(
    draws: Sequence[tuple[int, int]], vocab: int, generator: torch.Generator
) -> torch.Tensor:
    """Gumbel noise [len(draws), vocab] on the generator's device: row i for new token `index`
    of a request drawn with `seed`, (seed, index) = draws[i], and depending on that pair alone."""
    # One buffer, drawn into row by row and transformed in place: the same values without a
    # tensor per row, their stack and the transform's temporaries (9 rows of a 152k-token
    # vocabulary on 2 CPU cores: 7.4-8.5 -> 5.8-6.4 ms, bench/sampling_cost.py).
    noise = torch.empty(len(draws), vocab, device=generator.device)
    for row, (seed, index) in zip(noise, draws, strict=True):
        generator.manual_seed(position_seed(seed, index))
        torch.rand(vocab, generator=generator, out=row)
    return noise.log_().neg_().log_().neg_()  # -log(-log(u)); u = 0 gives -inf: never drawn


def indices(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """`values` as int64 ids on `device`, without waiting for it: on a GPU through page-locked
    memory (a list index, or a plain copy, would wait for every queued kernel first, and the
    engine queues the next pass before it reads this one's tokens)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    host = torch.tensor(values, dtype=torch.int64, pin_memory=True)
    return host.to(device, non_blocking=True)


def suppress(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """`logits` [V] with `token_ids` made impossible (end-of-text before min_new_tokens)."""
    ids = [i for i in token_ids if 0 <= i < logits.shape[-1]]
    if not ids:
        return logits
    return logits.index_fill(-1, indices(ids, logits.device), float("-inf"))


def warp(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of rows of logits [..., V].

    `top_k <= 0` or `>= V` and `top_p >= 1` disable their filter. At least one token of each row
    always survives, so the result can be sampled from.
    """
    scores = logits.float() / min(temperature, MAX_TEMPERATURE)  # [..., V]
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def pick(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    draws: Sequence[tuple[int, int]],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids [P] on the logits' device for `logits` [P, V], row i drawn as new token `index`
    of a request with `seed`, (seed, index) = draws[i] (`generator`, on that device, is reseeded
    for each; a new one if None). Rows of one request or of several that share the warp.

    Temperatures at or below GREEDY_TEMPERATURE (HELM sends 1e-7 for 0) take the argmax: dividing
    by 1e-7 would overflow to inf and sampling would then be arbitrary. Nothing waits for the
    device here: the batch's choices are read back together.
    """
    if temperature <= GREEDY_TEMPERATURE:
        return torch.argmax(logits, dim=-1)
    scores = warp(logits, temperature=temperature, top_k=top_k, top_p=top_p)  # [P, V]
    generator = generator or torch.Generator(device=logits.device)
    return torch.argmax(scores + gumbel(draws, scores.shape[-1], generator), dim=-1)
