"""Continuous batching: running requests share each decode step, and join or leave between steps.

Each request owns one row of a fixed slot cache (`kvcache.SlotCache`) while it runs. `admit`
places a new request in a free row (starting from the longest prompt prefix some row already
holds, see `prefix`) and prefills the rest; `step` feeds every running row's last token through
one forward pass (a replayed CUDA graph on the GPU, see `decode_step`). Per-request state
(sampling, stopping, detokenizing, logprobs) lives in `_Sequence`, so what a request gets does
not depend on what it shares the batch with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from onegpu.engine.decode_step import DecodeStep, additive_mask
from onegpu.engine.detokenize import IncrementalDetokenizer, token_pieces
from onegpu.engine.kvcache import SlotCache
from onegpu.engine.logprobs import finite, gather_logprobs
from onegpu.engine.prefix import place
from onegpu.engine.sampling import choose_token, suppress
from onegpu.engine.stopping import StopMatcher, cut_pieces
from onegpu.engine.types import (
    Completion,
    ContextWindowError,
    EngineFatalError,
    EngineInternalError,
    EngineOverloadedError,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    RequestCancelledError,
    TokenInfo,
)

log = logging.getLogger(__name__)

# Positions scored per chunk when echoing a prompt: bounds the float32 log-softmax temporaries.
_SCORE_CHUNK = 256


# Requests answered without an out-of-memory before the engine admits one more at once again.
_RECOVER_AFTER = 50


def _never() -> bool:
    return False


@dataclass
class _Scored:
    """One token with its raw log-probability and its top alternatives."""

    token_id: int
    logprob: float
    top: dict[str, float]


@dataclass
class _Sequence:
    """The state of one request while it generates."""

    request: GenerationRequest
    prompt_ids: list[int]
    model_ids: list[int]
    stops: StopMatcher
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    future: Future[Completion]
    cancelled: Callable[[], bool]
    started: float
    row: int = -1
    position: int = 0  # cached positions in its row = where the next fed token goes
    last_token: int = 0
    echoed: list[TokenInfo] = field(default_factory=list)
    scored: list[_Scored] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_at: int | None = None
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """A loaded causal LM and its tokenizer, running up to `slots` requests at once.

    One thread drives it (`admit`, `step`; see `EngineWorker`), or `generate` runs a single
    request to completion. `tokenize` and `decode` are safe from any thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        info: ModelInfo,
        default_stop: Sequence[str] = ("\n\n",),
        slots: int = 4,
        cuda_graphs: bool = True,
        prefix_reuse: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.default_stop = tuple(default_stop)
        self.device = torch.device(info.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.prefix_reuse = prefix_reuse
        self._tokenizer_lock = threading.Lock()
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)
        self.cache = SlotCache(slots, info.max_context)
        self._decode_step = DecodeStep(model, self.cache, graphs=cuda_graphs)
        self._running: dict[int, _Sequence] = {}
        self._free: list[int] = list(range(slots))  # oldest released first
        self._resident: list[list[int]] = [[] for _ in range(slots)]
        self.admit_limit = slots
        self._clean_since_oom = 0
        self.oom_count = 0
        self.reused_tokens = 0
        self.fatal: EngineFatalError | None = None

    # -- text <-> ids ---------------------------------------------------------------------------

    def tokenize(
        self, text: str, *, truncation: bool = False, max_length: int | None = None
    ) -> list[int]:
        """The ids the model sees for `text` (those `generate` uses), optionally truncated."""
        with self._tokenizer_lock:
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text for `ids`; raises InvalidRequestError for ids outside the vocabulary."""
        vocab = self.info.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequestError(
                f"token ids must be in [0, {vocab}); got {bad[:5]}"
                + (" ..." if len(bad) > 5 else "")
            )
        return self._decode(ids, skip_special_tokens=skip_special_tokens)

    def _decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(
                list(ids),
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )

    def _decode_raw(self, ids: Sequence[int]) -> str:
        # Generated ids need no range check: the model's vocabulary bounds them.
        return self._decode(ids, skip_special_tokens=False)

    def _decode_one(self, token_id: int) -> str:
        return self._decode_raw([token_id])

    # -- scheduling -----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def has_room(self) -> bool:
        """Whether `admit` can take another request now."""
        return len(self._running) < self.admit_limit  # admit_limit <= slots

    def warmup(self) -> None:
        """Allocate the KV cache and capture the decode graphs before the first request."""
        self.generate(GenerationRequest(prompt="warm up", max_new_tokens=2, temperature=0))
        with torch.no_grad():
            self._decode_step.capture_all()

    def memory(self) -> dict[str, int]:
        """GPU memory in bytes (allocated now, peak, reserved, KV cache); empty on the CPU."""
        if self.device.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
            "kv_cache": self.cache.nbytes(),
        }

    def generate(
        self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None
    ) -> Completion:
        """Run one request to completion on an otherwise idle engine (tests, benchmarks, CLI).

        Raises what the request failed with: InvalidRequestError if it cannot be served,
        EngineOverloadedError after a GPU out-of-memory, RequestCancelledError when
        `cancelled()` turned True between decode steps.
        """
        future: Future[Completion] = Future()
        future.set_running_or_notify_cancel()
        self.admit(request, future, cancelled=cancelled)
        while not future.done():
            self.step()
        return future.result()

    def admit(
        self,
        request: GenerationRequest,
        future: Future[Completion],
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Start `request` in a free cache row: prefill its prompt and choose its first token.

        The outcome goes to `future` (a result or the request's error), now or from a later
        `step`. Only a broken device raises (EngineFatalError), after failing every request.
        """
        if not self.has_room:
            raise RuntimeError("admit() called with no free row; check has_room first")
        started = time.perf_counter()
        try:
            seq = self._new_sequence(request, future, cancelled or _never, started)
        except InvalidRequestError as exc:
            future.set_exception(exc)
            return
        except Exception as exc:  # a bug met before the request took a row: fail it alone
            log.exception("request failed before it started")
            future.set_exception(EngineInternalError.of(exc))
            return
        self._guarded([seq], lambda: self._prefill(seq))

    def step(self) -> None:
        """One decode step for every running request; finished ones get their result."""
        for seq in [s for s in self._running.values() if s.cancelled()]:
            self._release(seq, RequestCancelledError("the request was cancelled"))
        if self._running:
            seqs = list(self._running.values())
            self._guarded(seqs, lambda: self._decode_running(seqs))

    def _guarded(self, seqs: list[_Sequence], work: Callable[[], None]) -> None:
        """Run `work` for `seqs`; a failure fails those requests, and only a GPU fault more."""
        try:
            with torch.no_grad():
                work()
            return
        except torch.cuda.OutOfMemoryError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
        except Exception as exc:
            # CUDA faults (device asserts, illegal accesses) poison the context for good.
            if isinstance(exc, RuntimeError) and (
                "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc)
            ):
                error = EngineFatalError(f"the GPU failed: {exc}")
                self.fatal = error  # before any caller hears of it: readiness turns 503 first
                self._fail(list(self._running.values()) + seqs, error)
                raise error from exc
            log.exception("request failed inside the engine")
            self._fail(seqs, EngineInternalError.of(exc))
            return
        # Out of the except block, the traceback (and the activations its frames held) is gone,
        # so emptying the allocator's cache really returns that memory.
        self.oom_count += 1
        self._clean_since_oom = 0
        self._fail(
            seqs,
            EngineOverloadedError(
                "the GPU ran out of memory for this request; retry later or shorten it"
            ),
        )
        # Admit less at once from now on: as many as ran without failing, at least one.
        self.admit_limit = max(1, min(self.admit_limit, len(self._running) + len(seqs)) - 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning(
            "GPU out of memory (%d so far): %s; admitting at most %d requests at once now",
            self.oom_count,
            reason,
            self.admit_limit,
        )

    def _fail(self, seqs: list[_Sequence], error: BaseException) -> None:
        for seq in seqs:
            self._release(seq, error)

    def _release(self, seq: _Sequence, outcome: Completion | BaseException) -> None:
        """Finish `seq`: hand its row back and deliver its result or error."""
        if self._running.get(seq.row) is seq:
            del self._running[seq.row]
            self._free.append(seq.row)
        elif seq.row >= 0 and seq.row not in self._free:
            # It took a row but its prefill never completed: the row holds only what was there.
            self._free.append(seq.row)
        if seq.future.done():
            return
        if isinstance(outcome, BaseException):
            seq.future.set_exception(outcome)
            return
        seq.future.set_result(outcome)
        # After an out-of-memory, give back one row of concurrency per run of clean requests.
        self._clean_since_oom += 1
        if self.admit_limit < self.cache.slots and self._clean_since_oom >= _RECOVER_AFTER:
            self.admit_limit += 1
            self._clean_since_oom = 0

    # -- one request ----------------------------------------------------------------------------

    def _new_sequence(
        self,
        request: GenerationRequest,
        future: Future[Completion],
        cancelled: Callable[[], bool],
        started: float,
    ) -> _Sequence:
        prompt_ids = self.tokenize(request.prompt)
        if len(prompt_ids) + request.max_new_tokens > self.info.max_context:
            raise ContextWindowError(len(prompt_ids), request.max_new_tokens, self.info.max_context)
        if request.stop_sequences:
            stops = StopMatcher(hard=tuple(request.stop_sequences))
        elif request.max_new_tokens > 1:
            stops = StopMatcher(soft=self.default_stop)
        else:
            stops = StopMatcher()
        generator = None
        if not request.greedy and request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        return _Sequence(
            request=request,
            prompt_ids=prompt_ids,
            # A prompt that encodes to nothing still needs one position to predict from.
            model_ids=prompt_ids or [self._start_token()],
            stops=stops,
            detok=IncrementalDetokenizer(self._decode_raw, context_ids=prompt_ids),
            eos_ids=self.eos_ids,
            generator=generator,
            future=future,
            cancelled=cancelled,
            started=started,
        )

    def _prefill(self, seq: _Sequence) -> None:
        """Put `seq` in a free row, compute its prompt's cache and choose its first token."""
        request = seq.request
        echo_all = request.echo_prompt and len(seq.prompt_ids) > 1
        ids = seq.model_ids
        # Echo needs logits at every prompt position, so it recomputes the whole prompt.
        reusable = self.prefix_reuse and not echo_all
        resident = self._resident if reusable else [[] for _ in self._resident]
        placement = place(ids, resident, self._free)
        seq.row = placement.row
        self._free.remove(seq.row)
        self._resident[seq.row] = []
        reuse = placement.reuse
        if placement.source != seq.row:
            self.cache.copy_prefix(placement.source, seq.row, reuse)
        self._resident[seq.row] = list(ids[:reuse])
        self.reused_tokens += reuse

        count = len(ids) - reuse
        input_ids = torch.tensor([ids[reuse:]], device=self.device)  # [1, T]
        positions = torch.arange(reuse, len(ids), device=self.device)  # [T]
        columns = torch.arange(len(ids), device=self.device)
        mask = additive_mask(columns[None, :] <= positions[:, None], self._decode_step.dtype)
        self.cache.prefill(seq.row, reuse, count)
        out = self.model(
            input_ids=input_ids,
            position_ids=positions[None],
            attention_mask=mask[None, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=0 if echo_all else 1,
        )
        self._resident[seq.row] = list(ids)
        self._running[seq.row] = seq
        seq.position = len(ids)
        if request.echo_prompt:
            seq.echoed = self._score_prompt(seq.prompt_ids, out.logits[0], request.top_k_per_token)
        if request.max_new_tokens == 0:
            seq.finish_reason = "prompt_only" if request.echo_prompt else "length"
            self._release(seq, self._finish(seq))
            return
        self._advance([seq], out.logits[:, -1])

    def _decode_running(self, seqs: list[_Sequence]) -> None:
        feed = {seq.row: (seq.last_token, seq.position) for seq in seqs}
        logits = self._decode_step(feed)  # [slots, V]
        for seq in seqs:
            self._resident[seq.row].append(seq.last_token)
            seq.position += 1
        rows = torch.tensor([seq.row for seq in seqs], device=logits.device)
        self._advance(seqs, logits.index_select(0, rows))

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Choose, score and record the next token of each of `seqs` from its logits [len, V]."""
        token_ids = self._choose(seqs, logits)
        k = max(seq.request.top_k_per_token for seq in seqs)
        scored = self._score(logits, token_ids, k)
        now = time.perf_counter()
        for seq, token_id, score in zip(seqs, token_ids, scored, strict=True):
            if seq.first_token_at is None:
                seq.first_token_at = now
            self._record(seq, token_id, score)
            if seq.done:
                self._release(seq, self._finish(seq))

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token: one argmax for all greedy ones, sampling for the rest."""
        choice = logits
        early = [i for i, seq in enumerate(seqs) if len(seq.scored) < seq.request.min_new_tokens]
        if early:
            choice = logits.clone()
            for i in early:
                choice[i] = suppress(logits[i], seqs[i].eos_ids)
        chosen = torch.argmax(choice, dim=-1).tolist()
        for i, seq in enumerate(seqs):
            request = seq.request
            if not request.greedy:
                chosen[i] = choose_token(
                    choice[i],
                    temperature=request.temperature,
                    top_k=request.top_k,
                    top_p=request.top_p,
                    generator=seq.generator,
                )
        return chosen

    def _record(self, seq: _Sequence, token_id: int, score: _Scored) -> None:
        request = seq.request
        if token_id in seq.eos_ids:
            seq.finish_reason = "eos"
            return
        # Logprobs come from the raw logits, not from the suppressed or warped scores.
        top = dict(list(score.top.items())[: request.top_k_per_token])
        seq.scored.append(_Scored(token_id, score.logprob, top))
        seq.last_token = token_id
        piece = seq.detok.push(token_id)
        seq.pieces.append(piece)
        since = len(seq.text)
        seq.text += piece
        if (stop_at := seq.stops.find(seq.text, since)) is not None:
            seq.stop_at, seq.finish_reason = stop_at, "stop"
        elif len(seq.scored) >= request.max_new_tokens:
            seq.finish_reason = "length"

    def _finish(self, seq: _Sequence) -> Completion:
        started, echoed = seq.started, seq.echoed
        pieces = seq.pieces
        if seq.stop_at is None and pieces:
            pieces[-1] += seq.detok.flush()
            seq.text = "".join(pieces)
            if (stop_at := seq.stops.find(seq.text)) is not None:
                seq.stop_at, seq.finish_reason = stop_at, "stop"
        if seq.stop_at is not None:
            pieces = cut_pieces(pieces, seq.stop_at)
        generated = [
            TokenInfo(text=piece, logprob=s.logprob, top_logprob=s.top)
            for piece, s in zip(pieces, seq.scored, strict=False)
        ]
        tokens = echoed + generated
        seconds = time.perf_counter() - started
        completion = Completion(
            text="".join(t.text for t in tokens),
            tokens=tokens,
            logprob=finite(sum(t.logprob for t in tokens)),
            prompt_tokens=len(seq.prompt_ids),
            new_tokens=len(seq.scored),
            finish_reason=seq.finish_reason or "length",
            seconds=seconds,
            first_token_seconds=(
                seq.first_token_at - started if seq.first_token_at is not None else None
            ),
            token_ids=[s.token_id for s in seq.scored[: len(generated)]],
        )
        log.info(
            "request done: prompt_tokens=%d new_tokens=%d seconds=%.3f tokens_per_s=%.1f finish=%s",
            completion.prompt_tokens,
            completion.new_tokens,
            seconds,
            completion.new_tokens / seconds if seconds > 0 else 0.0,
            completion.finish_reason,
        )
        return completion

    # -- logprobs -------------------------------------------------------------------------------

    def _score(self, logits: torch.Tensor, targets: Sequence[int], k: int) -> list[_Scored]:
        """Score `targets` under `logits` [T, V]; one `_Scored` per target."""
        scored = []
        for begin in range(0, len(targets), _SCORE_CHUNK):
            chunk = list(targets[begin : begin + _SCORE_CHUNK])
            target_tensor = torch.tensor(chunk, device=logits.device)
            rows = logits[begin : begin + len(chunk)]
            chosen, top_values, top_ids = gather_logprobs(rows, target_tensor, k)
            for t, token_id in enumerate(chunk):
                top: dict[str, float] = {}
                for value, alt in zip(top_values[t].tolist(), top_ids[t].tolist(), strict=True):
                    top.setdefault(self._token_text(alt), finite(value))
                scored.append(_Scored(int(token_id), finite(float(chosen[t])), top))
        return scored

    def _score_prompt(self, prompt_ids: list[int], logits: torch.Tensor, k: int) -> list[TokenInfo]:
        """Echoed prompt tokens: token t is scored by the logits at t-1 (logits: [T, V]).

        The first token has nothing to be predicted from: it gets logprob 0 and no alternatives.
        """
        if not prompt_ids:
            return []
        pieces = token_pieces(self._decode_raw, prompt_ids)
        scored = self._score(logits[:-1], prompt_ids[1:], k) if len(prompt_ids) > 1 else []
        first = TokenInfo(text=pieces[0], logprob=0.0, top_logprob={})
        return [first] + [
            TokenInfo(text=piece, logprob=s.logprob, top_logprob=s.top)
            for piece, s in zip(pieces[1:], scored, strict=True)
        ]

    def _start_token(self) -> int:
        for candidate in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0


def _eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's, the config's, the generation config's."""
    ids: set[int] = set()
    sources = [
        tokenizer.eos_token_id,
        getattr(model.config, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
