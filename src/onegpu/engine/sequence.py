"""One request while it runs, in two parts.

- `Sequence` is what the scheduler reads: the tokens fed to the model and where their keys and
  values live in the cache. It never sees text, logprobs or the caller.
- `Output` is what the request produces: each chosen token with its logprobs, the text cut at a
  stop sequence, and the future its caller waits on. `record` takes each token; `finish`
  builds the Completion.

`start` builds both from a request and its prompt ids. Sampling, stopping, detokenizing and
logprobs are per request, so what a request gets does not depend on what it shares a batch with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from onegpu.engine.detokenize import IncrementalDetokenizer, token_pieces
from onegpu.engine.logprobs import finite
from onegpu.engine.sampling import request_seed
from onegpu.engine.stopping import StopMatcher, cut_pieces
from onegpu.engine.text import Text
from onegpu.engine.types import Completion, ContextWindowError, GenerationRequest, TokenInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Scored:
    """One token with its raw log-probability and its top alternatives."""

    token_id: int
    logprob: float
    top: dict[str, float]


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request: its tokens and its cache."""

    key: int  # arrival order; younger sequences are preempted first
    # Every token fed or to be fed to the model: the prompt (or a start token for an empty
    # prompt), then each generated token.
    ids: list[int]
    prompt_len: int
    echo: bool = False  # its prompt is scored, so it never reads cached blocks
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
    # Tokens guessed to follow (speculation): the next decode verifies them with the last token,
    # so the cache must hold that many positions more.
    draft: list[int] = field(default_factory=list)
    output: Output | None = None  # the engine's; the scheduler never reads it

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def target(self) -> int:
        """Positions to prefill: the prompt, or after a preemption everything but the token the
        next decode step feeds."""
        return len(self.ids) - 1 if self.generated else len(self.ids)

    @property
    def prefilling(self) -> bool:
        return self.admitted and self.computed < self.target

    @property
    def decoding(self) -> bool:
        return self.admitted and self.computed >= self.target

    def evict(self) -> None:
        """Forget the cache (its blocks were released); prefill starts over on readmission."""
        self.table, self.computed, self.names, self.published = [], 0, [], 0
        self.draft = []
        self.admitted = False
        self.preemptions += 1


@dataclass(eq=False)
class Output:
    """What one request produces, and how it ends."""

    request: GenerationRequest
    prompt_ids: list[int]
    stops: StopMatcher
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    # A sampled request's seed (its own or a random one) and the generator its noise is drawn
    # from (`sampling.gumbel`); None for a greedy one.
    seed: int | None
    generator: torch.Generator | None
    future: Future[Completion]
    cancelled: Callable[[], bool]
    started: float
    prompt_scores: dict[int, Scored] = field(default_factory=dict)  # echo: by prompt position
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
    def alternatives(self) -> int:
        """The best tokens reported beside each scored one (`top_k_per_token`)."""
        return self.request.top_k_per_token

    def record(self, token_id: int, score: Scored) -> bool:
        """Take the next chosen token; False for an end-of-text (it ends the request unfed).

        Sets `finish_reason` when the token ends the request.
        """
        request = self.request
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        # Logprobs come from the raw logits, not from the suppressed or warped scores.
        top = dict(list(score.top.items())[: self.alternatives])
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            if request.keep_eos:
                self.scored.append(Scored(token_id, score.logprob, top))
                self.pieces.append("")
            return False
        self.scored.append(Scored(token_id, score.logprob, top))
        piece = self.detok.push(token_id)
        self.pieces.append(piece)
        since = len(self.text)
        self.text += piece
        if (stop_at := self.stops.find(self.text, since)) is not None:
            self.stop_at, self.finish_reason = stop_at, "stop"
        elif len(self.scored) >= request.max_new_tokens:
            self.finish_reason = "length"
        return True

    def finish(self, decode: Callable[[list[int]], str]) -> Completion:
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
        tokens = self._echoed(decode) + generated
        seconds = time.perf_counter() - self.started
        return Completion(
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

    def _echoed(self, decode: Callable[[list[int]], str]) -> list[TokenInfo]:
        """The prompt's tokens when echoed: token t scored by the logits at t - 1 (the first
        gets 0 and no alternatives)."""
        if not self.request.echo_prompt or not self.prompt_ids:
            return []
        pieces = token_pieces(decode, self.prompt_ids)
        first = TokenInfo(text=pieces[0], logprob=0.0, top_logprob={})
        return [first] + [
            TokenInfo(text=piece, logprob=s.logprob, top_logprob=s.top)
            for piece, s in zip(
                pieces[1:], (self.prompt_scores[p] for p in range(1, len(pieces))), strict=True
            )
        ]


def log_done(completion: Completion, *, reused: int, request_id: str | None) -> None:
    """The one log line per request: sizes, time, speed, how it ended (never its text)."""
    seconds = completion.seconds
    log.info(
        "request done: id=%s prompt_tokens=%d reused=%d new_tokens=%d seconds=%.3f "
        "tokens_per_s=%.1f finish=%s",
        request_id or "-",
        completion.prompt_tokens,
        reused,
        completion.new_tokens,
        seconds,
        completion.new_tokens / seconds if seconds > 0 else 0.0,
        completion.finish_reason,
    )


def start(
    key: int,
    request: GenerationRequest,
    prompt_ids: list[int],
    *,
    text: Text,
    default_stop: tuple[str, ...],
    max_context: int,
    device: torch.device,
    future: Future[Completion],
    cancelled: Callable[[], bool],
) -> Sequence:
    """A new request's sequence and output; ContextWindowError when it cannot fit.

    Stops: the request's own, else (when it asks for more than one token) the server's default
    cut. A sampled request gets its seed (a random one when it names none) and a generator.
    """
    if len(prompt_ids) + request.max_new_tokens > max_context:
        raise ContextWindowError(len(prompt_ids), request.max_new_tokens, max_context)
    if request.stop_sequences:
        stops = StopMatcher(hard=tuple(request.stop_sequences))
    elif request.max_new_tokens > 1 and request.default_stop:
        stops = StopMatcher(soft=default_stop)
    else:
        stops = StopMatcher()
    seed = generator = None
    if not request.greedy:
        seed, generator = request_seed(request.seed), torch.Generator(device=device)
    output = Output(
        request=request,
        prompt_ids=prompt_ids,
        stops=stops,
        detok=IncrementalDetokenizer(text.raw, context_ids=prompt_ids),
        eos_ids=text.eos_ids,
        seed=seed,
        generator=generator,
        future=future,
        cancelled=cancelled,
        started=time.perf_counter(),
    )
    # A prompt that encodes to nothing still needs one position to predict from.
    ids = list(prompt_ids or [text.start_token()])
    return Sequence(key=key, ids=ids, prompt_len=len(ids), echo=request.echo_prompt, output=output)
