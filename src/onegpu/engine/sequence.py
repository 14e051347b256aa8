"""One request while it runs: its tokens, where its cache lives, and what it has produced.

Sampling, stopping, detokenizing and logprobs are per sequence, so what a request gets does not
depend on what it shares a batch with. `record` takes each chosen token; `finish` builds the
Completion once the sequence is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from onegpu.engine.detokenize import IncrementalDetokenizer
from onegpu.engine.logprobs import finite
from onegpu.engine.stopping import StopMatcher, cut_pieces
from onegpu.engine.types import Completion, GenerationRequest, TokenInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Scored:
    """One token with its raw log-probability and its top alternatives."""

    token_id: int
    logprob: float
    top: dict[str, float]


@dataclass(eq=False)
class Sequence:
    """The state of one request from admission to its result."""

    key: int  # arrival order; younger sequences are preempted first
    request: GenerationRequest
    prompt_ids: list[int]
    stops: StopMatcher
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    future: Future[Completion]
    cancelled: Callable[[], bool]
    started: float
    # Every token fed or to be fed to the model: the prompt (or a start token for an empty
    # prompt), then each generated token.
    ids: list[int] = field(default_factory=list)
    # The cache: its block table, how many positions are computed, the names of its full blocks
    # shared through the prefix cache (none for echo requests), how many of those are computed.
    table: list[int] = field(default_factory=list)
    computed: int = 0
    names: list[bytes] = field(default_factory=list)
    published: int = 0
    admitted: bool = False
    overtaken: int = 0  # later requests admitted while it waited for memory
    preemptions: int = 0
    reused: int = 0
    # What it produced.
    prompt_scores: list[Scored] = field(default_factory=list)  # echo: prompt tokens 1..
    echoed: list[TokenInfo] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_at: int | None = None
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def echo(self) -> bool:
        """Whether its prompt's own logprobs are returned (so it never reads cached blocks)."""
        return self.request.echo_prompt

    @property
    def target(self) -> int:
        """Positions to prefill: the prompt, or after a preemption everything but the token the
        next decode step feeds."""
        return len(self.ids) - 1 if self.scored else len(self.ids)

    @property
    def prefilling(self) -> bool:
        return self.admitted and self.computed < self.target

    @property
    def decoding(self) -> bool:
        return self.admitted and self.computed >= self.target

    def evict(self) -> None:
        """Forget the cache (its blocks were released); prefill starts over on readmission."""
        self.table, self.computed, self.names, self.published = [], 0, [], 0
        self.admitted = False
        if not self.scored:
            self.prompt_scores = []  # its prompt is prefilled (and scored) again
        self.preemptions += 1

    def record(self, token_id: int, score: Scored) -> None:
        """Take the next chosen token; sets `finish_reason` when it ends the sequence."""
        request = self.request
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return
        # Logprobs come from the raw logits, not from the suppressed or warped scores.
        top = dict(list(score.top.items())[: request.top_k_per_token])
        self.scored.append(Scored(token_id, score.logprob, top))
        self.ids.append(token_id)
        piece = self.detok.push(token_id)
        self.pieces.append(piece)
        since = len(self.text)
        self.text += piece
        if (stop_at := self.stops.find(self.text, since)) is not None:
            self.stop_at, self.finish_reason = stop_at, "stop"
        elif len(self.scored) >= request.max_new_tokens:
            self.finish_reason = "length"

    def finish(self) -> Completion:
        """The result: text cut at a stop sequence, per-token logprobs, timings."""
        pieces = self.pieces
        if self.stop_at is None and pieces:
            pieces[-1] += self.detok.flush()
            self.text = "".join(pieces)
            if (stop_at := self.stops.find(self.text)) is not None:
                self.stop_at, self.finish_reason = stop_at, "stop"
        if self.stop_at is not None:
            pieces = cut_pieces(pieces, self.stop_at)
        generated = [
            TokenInfo(text=piece, logprob=s.logprob, top_logprob=s.top)
            for piece, s in zip(pieces, self.scored, strict=False)
        ]
        tokens = self.echoed + generated
        seconds = time.perf_counter() - self.started
        completion = Completion(
            text="".join(t.text for t in tokens),
            tokens=tokens,
            logprob=finite(sum(t.logprob for t in tokens)),
            prompt_tokens=len(self.prompt_ids),
            new_tokens=len(self.scored),
            finish_reason=self.finish_reason or "length",
            seconds=seconds,
            first_token_seconds=(
                self.first_token_at - self.started if self.first_token_at is not None else None
            ),
            token_ids=[s.token_id for s in self.scored[: len(generated)]],
        )
        log.info(
            "request done: prompt_tokens=%d reused=%d new_tokens=%d seconds=%.3f "
            "tokens_per_s=%.1f finish=%s",
            completion.prompt_tokens,
            self.reused,
            completion.new_tokens,
            seconds,
            completion.new_tokens / seconds if seconds > 0 else 0.0,
            completion.finish_reason,
        )
        return completion
