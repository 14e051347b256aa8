"""Sliding-window perplexity, the standard quality check for a quantized causal LM.

The text (WikiText-2 test rows joined with a blank line) is tokenized once. Windows of
``max_length`` tokens start every ``stride`` tokens and score only the tokens that no earlier
window scored (the Hugging Face perplexity guide's algorithm). With ``stride < max_length`` every
token after the first is scored once, with at least ``max_length - stride`` tokens of context.
``stride == max_length`` gives the GPTQ paper's non-overlapping chunks, where a chunk's first
token has no context and is not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from onegpu.quantize.calibration import WIKITEXT2, load_text


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens ``[begin, end)`` in, targets ``[score_from, end)`` scored."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True)
class Perplexity:
    """Result of a perplexity run: exp of the mean next-token negative log-likelihood."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # scored tokens
    max_length: int
    stride: int


def windows(n_tokens: int, *, max_length: int, stride: int) -> list[Window]:
    """Forward passes that score each token at most once, always with some context."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    out: list[Window] = []
    scored_until = 1  # token 0 is never a target
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        if end > scored_until:
            out.append(Window(begin, end, max(scored_until, begin + 1)))
            scored_until = end
        if end == n_tokens:
            break
    return out


def wikitext2_test_text(source: str | Path = WIKITEXT2) -> str:
    """WikiText-2 raw test split joined with blank lines, from the Hub or a local rows file."""
    text, _ = load_text(source, split="test")
    return text


@torch.inference_mode()
def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_length: int = 2048,
    stride: int = 512,
    max_tokens: int | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> Perplexity:
    """Perplexity of ``model`` (a transformers causal LM) on one long token sequence.

    ``input_ids`` is ``[N]`` or ``[1, N]``; ``max_tokens`` keeps only the first tokens, to bound
    the cost. Log-probabilities are computed in float32 on the model's device.
    """
    ids = input_ids.reshape(-1)  # [N]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    plan = windows(ids.numel(), max_length=max_length, stride=stride)
    nll_sum = 0.0
    n_scored = 0
    for w in tqdm(plan, desc=desc, unit="window", disable=not progress):
        chunk = ids[w.begin : w.end].unsqueeze(0).to(device)  # [1, T]
        # Targets t in [score_from, end) are predicted by positions t-1: the last n+1 logits
        # less the final one, so only those are materialized (vocab can be 150k wide).
        keep = w.n_scored + 1
        logits = model(chunk, logits_to_keep=keep, use_cache=False).logits  # [1, keep, V]
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # [n, V]
        targets = ids[w.score_from : w.end].to(device)  # [n]
        nll_sum -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        n_scored += w.n_scored
    nll = nll_sum / n_scored
    return Perplexity(
        ppl=math.exp(nll), nll=nll, n_tokens=n_scored, max_length=max_length, stride=stride
    )
