"""From logits to answers: each request's next token and every score HELM reads.

`choose` picks every row's token on the device (one argmax for the greedy rows, sampling keyed by
the token's index for the others, end-of-text suppressed before `min_new_tokens`); `choose_run`
picks one request's tokens at several positions, as `choose` would one at a time; `score` turns
logits and targets into raw logprobs with their top alternatives, copied back in one transfer,
either at once or (`Scores`) launched now and read once the device is done. Echoed prompts are
scored position by position as their chunks are prefilled (`prompt_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from onegpu.engine.logprobs import finite, pack_logprobs, unpack
from onegpu.engine.sampling import indices, pick, suppress
from onegpu.engine.sequence import Output, Scored

# Positions scored at once: bounds the float32 log-softmax temporaries ([256, V]).
SCORE_CHUNK = 256


def choose(logits: torch.Tensor, outputs: Sequence[Output], *, ahead: int = 0) -> torch.Tensor:
    """Each request's next token from its row of `logits` [n, V]: ids [n] on the device. The
    sampled rows that share a warp (temperature, top-k, top-p) are drawn together.

    `ahead`: tokens each request has taken that its output does not hold yet (chosen on the
    device, recorded later: `Engine` overlapping a step with the next); the token chosen here
    is the request's len(scored) + ahead-th."""
    choice = logits
    early = [
        i for i, out in enumerate(outputs) if len(out.scored) + ahead < out.request.min_new_tokens
    ]
    if early:
        choice = logits.clone()
        for i in early:
            choice[i] = suppress(logits[i], outputs[i].eos_ids)
    chosen = torch.argmax(choice, dim=-1)
    warps: dict[tuple[float, int, float], list[int]] = {}
    for i, out in enumerate(outputs):
        request = out.request
        if not request.greedy:
            warps.setdefault((request.temperature, request.top_k, request.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in warps.items():
        index = indices(rows, chosen.device)  # a list index would wait for the queued passes
        chosen[index] = pick(
            choice[index],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            draws=[(outputs[i].seed, len(outputs[i].scored) + ahead) for i in rows],
            generator=outputs[rows[0]].generator,
        )
    return chosen


def choose_run(logits: torch.Tensor, out: Output) -> torch.Tensor:
    """The request's tokens [P] at the P positions of `logits` [P, V], its next P new tokens,
    each as `choose` would pick it there (a sampled token depends on its index alone, not on
    the others). Nothing is suppressed: runs are verified only past `min_new_tokens`."""
    request = out.request
    if request.greedy:
        return torch.argmax(logits, dim=-1)
    first = len(out.scored)
    return pick(
        logits,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        draws=[(out.seed, first + i) for i in range(len(logits))],
        generator=out.generator,
    )


class Scores:
    """Scores of `targets` [T] under `logits` [T, V] (raw logprob and the k best per position),
    launched on the device when made, read (`read`) when the host needs them: in between, the
    host may queue more work for the device, which the read does not wait for."""

    def __init__(
        self, logits: torch.Tensor, targets: torch.Tensor, k: int, *, invariant: bool = False
    ) -> None:
        self._packed = []
        for begin in range(0, len(targets), SCORE_CHUNK):
            end = begin + SCORE_CHUNK
            packed = pack_logprobs(logits[begin:end], targets[begin:end], k, invariant=invariant)
            if packed.is_cuda:  # into page-locked memory: a copy the host need not wait for
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                packed = host.copy_(packed, non_blocking=True)
            self._packed.append(packed)
        self._done = None
        if logits.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    def read(self, token_text: Callable[[int], str]) -> list[Scored]:
        """The scores, once the device has computed and copied them (waits for that alone)."""
        if self._done is not None:
            self._done.synchronize()
        scored = []
        for packed in self._packed:
            got = unpack(packed)
            for t, token_id in enumerate(got.targets.tolist()):
                top: dict[str, float] = {}
                for value, alt in zip(
                    got.top_values[t].tolist(), got.top_ids[t].tolist(), strict=True
                ):
                    top.setdefault(token_text(alt), finite(value))
                scored.append(Scored(token_id, finite(float(got.chosen[t])), top))
        return scored


def score(
    logits: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    token_text: Callable[[int], str],
    *,
    invariant: bool = False,
) -> list[Scored]:
    """Score `targets` [T] under `logits` [T, V]: raw logprob and the k best per position."""
    return Scores(logits, targets, k, invariant=invariant).read(token_text)


def prompt_scores(
    prompt_ids: list[int],
    start: int,
    logits: torch.Tensor,
    k: int,
    token_text: Callable[[int], str],
    *,
    invariant: bool = False,
) -> list[Scored]:
    """Scores of the prompt tokens that the logits at positions start.. [T, V] predict.

    The logits at position p predict token p + 1; the last prompt position predicts the first
    generated token, which is not the prompt's to score.
    """
    targets = prompt_ids[start + 1 : start + 1 + len(logits)]
    if not targets:
        return []
    return score(logits[: len(targets)], torch.tensor(targets), k, token_text, invariant=invariant)
