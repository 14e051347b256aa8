"""The generation loop: prefill, then one token at a time over a KV cache.

Per-request state (sampling, stopping, detokenizing, logprobs) lives in `_Sequence`, apart from the
model call, so that a batched scheduler can later drive many sequences through one forward pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from onegpu.engine.detokenize import IncrementalDetokenizer, token_pieces
from onegpu.engine.logprobs import finite, gather_logprobs
from onegpu.engine.sampling import choose_token, suppress
from onegpu.engine.stopping import StopMatcher, cut_pieces
from onegpu.engine.types import (
    Completion,
    ContextWindowError,
    EngineFatalError,
    EngineOverloadedError,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    RequestCancelledError,
    TokenInfo,
)

log = logging.getLogger(__name__)


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
    stops: StopMatcher
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    generator: torch.Generator | None
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
    """A loaded causal LM and its tokenizer, serving one request at a time (`generate` blocks).

    Callers serialize access (see `EngineWorker`); `tokenize` and `decode` are safe from any thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        info: ModelInfo,
        default_stop: Sequence[str] = ("\n\n",),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.default_stop = tuple(default_stop)
        self.device = torch.device(info.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)
        self.oom_count = 0

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

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None
    ) -> Completion:
        """Run one request to completion; InvalidRequestError if it cannot be served.

        `cancelled` is polled between decode steps: when it returns True the request stops with
        RequestCancelledError. A GPU out-of-memory error frees the cache and becomes
        EngineOverloadedError, so the next request starts clean.
        """
        try:
            return self._generate(request, cancelled or (lambda: False))
        except torch.cuda.OutOfMemoryError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
        except RuntimeError as exc:
            # CUDA faults (device asserts, illegal accesses) poison the context for good.
            if "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):
                raise EngineFatalError(f"the GPU failed: {exc}") from exc
            raise
        # Out of the except block, the traceback (and the KV cache its frames held) is gone, so
        # emptying the allocator's cache really returns that memory.
        self.oom_count += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("GPU out of memory (%d so far): %s", self.oom_count, reason)
        raise EngineOverloadedError(
            "the GPU ran out of memory for this request; retry later or shorten it"
        )

    def memory(self) -> dict[str, int]:
        """GPU memory in bytes (allocated now, peak, reserved); empty on the CPU."""
        if self.device.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
        }

    @torch.inference_mode()
    def _generate(self, request: GenerationRequest, cancelled: Callable[[], bool]) -> Completion:
        started = time.perf_counter()
        prompt_ids = self.tokenize(request.prompt)
        prompt_len = len(prompt_ids)
        if prompt_len + request.max_new_tokens > self.info.max_context:
            raise ContextWindowError(prompt_len, request.max_new_tokens, self.info.max_context)

        # A prompt that encodes to nothing still needs one position to predict from.
        model_ids = prompt_ids or [self._start_token()]
        want_prompt_scores = request.echo_prompt and prompt_len > 1
        input_ids = torch.tensor([model_ids], device=self.device)  # [1, T]
        out = self.model(
            input_ids=input_ids,
            use_cache=request.max_new_tokens > 0,
            logits_to_keep=0 if want_prompt_scores else 1,
        )
        echoed = (
            self._score_prompt(prompt_ids, out.logits[0], request.top_k_per_token)
            if request.echo_prompt
            else []
        )

        seq = self._start_sequence(request, prompt_ids)
        if request.max_new_tokens == 0:
            seq.finish_reason = "prompt_only" if request.echo_prompt else "length"
        cache = out.past_key_values
        logits = out.logits[0, -1]  # [V]
        while not seq.done:
            token_id = self._step(seq, logits)
            if seq.first_token_at is None:
                seq.first_token_at = time.perf_counter()
            if seq.done:
                break
            if cancelled():
                raise RequestCancelledError("the request was cancelled")
            out = self.model(
                input_ids=torch.tensor([[token_id]], device=self.device),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[0, -1]
        return self._finish(seq, echoed, started)

    def _start_sequence(self, request: GenerationRequest, prompt_ids: list[int]) -> _Sequence:
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
            stops=stops,
            detok=IncrementalDetokenizer(self._decode_raw, context_ids=prompt_ids),
            eos_ids=self.eos_ids,
            generator=generator,
        )

    def _step(self, seq: _Sequence, logits: torch.Tensor) -> int:
        """Choose, score and record the next token of `seq` from its logits [V]."""
        request = seq.request
        row = logits
        if len(seq.scored) < request.min_new_tokens:
            row = suppress(logits, seq.eos_ids)
        token_id = choose_token(
            row,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            generator=seq.generator,
        )
        if token_id in seq.eos_ids:
            seq.finish_reason = "eos"
            return token_id
        # Logprobs come from the raw logits, not from the suppressed or warped scores.
        seq.scored.append(self._score(logits[None], [token_id], request.top_k_per_token)[0])
        piece = seq.detok.push(token_id)
        seq.pieces.append(piece)
        since = len(seq.text)
        seq.text += piece
        if (stop_at := seq.stops.find(seq.text, since)) is not None:
            seq.stop_at, seq.finish_reason = stop_at, "stop"
        elif len(seq.scored) >= request.max_new_tokens:
            seq.finish_reason = "length"
        return token_id

    def _finish(self, seq: _Sequence, echoed: list[TokenInfo], started: float) -> Completion:
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
        target_tensor = torch.tensor(list(targets), device=logits.device)
        chosen, top_values, top_ids = gather_logprobs(logits, target_tensor, k)
        scored = []
        for t, token_id in enumerate(targets):
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
