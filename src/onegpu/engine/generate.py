"""The engine: requests join a batch, share forward passes over a paged KV cache, and leave.

Each step reads admit -> prefill -> decode -> finish:
- admit: `schedule.Scheduler` starts waiting requests whose blocks fit, reusing the cached
  blocks of any prompt prefix it has seen (`blocks`), and preempts when memory runs out;
- prefill: the prompts being started share one packed pass, long ones in chunks (`forward`);
- decode: every sequence past its prompt feeds one token (a CUDA graph per batch size);
- finish: tokens are chosen and scored for the whole batch at once (`scoring`) and recorded per
  request (`sequence`); finished requests give their blocks back and get their result.
A failure in a pass fails the requests in it, not the engine; a GPU out-of-memory also makes the
engine admit fewer requests at once for a while.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from onegpu.engine.blocks import BlockPool
from onegpu.engine.config import EngineConfig
from onegpu.engine.detokenize import IncrementalDetokenizer, token_pieces
from onegpu.engine.forward import Chunk, Forward, Row
from onegpu.engine.invariant import make_invariant
from onegpu.engine.kvcache import PagedKVCache
from onegpu.engine.schedule import Scheduler
from onegpu.engine.scoring import choose, echo_tokens, prompt_scores, score
from onegpu.engine.sequence import Scored
from onegpu.engine.sequence import Sequence as Running
from onegpu.engine.stopping import StopMatcher
from onegpu.engine.text import Text
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
)

log = logging.getLogger(__name__)

DEFAULTS = EngineConfig()  # the engine's keyword defaults are the configuration's

# Requests answered without an out-of-memory before the engine admits one more at once again.
_RECOVER_AFTER = 50


def _never() -> bool:
    return False


class Engine:
    """A loaded causal LM and its tokenizer, running up to `max_batch` requests at once over a
    pool of `num_blocks` KV blocks of `block_size` positions.

    One thread drives it (`admit`, `step`; see `EngineWorker`), or `generate` runs a single
    request to completion. `tokenize` and `decode` are safe from any thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        info: ModelInfo,
        num_blocks: int,
        block_size: int = DEFAULTS.block_size,
        max_batch: int = DEFAULTS.max_batch,
        prefill_chunk: int = DEFAULTS.prefill_chunk,
        default_stop: Sequence[str] = DEFAULTS.default_stop,
        cuda_graphs: bool = DEFAULTS.cuda_graphs,
        prefix_cache: bool = DEFAULTS.prefix_cache,
        kv_dtype: str = DEFAULTS.kv_cache_dtype,
        deterministic: bool = DEFAULTS.deterministic,
        triton: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.default_stop = tuple(default_stop)
        self.device = torch.device(info.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_batch = max_batch
        if num_blocks * block_size < info.max_context + block_size:
            raise ValueError(
                f"{num_blocks} blocks of {block_size} cannot hold one {info.max_context}-token "
                "context (plus the null block)"
            )
        self.text = Text(tokenizer, info.vocab_size)
        self.cache = PagedKVCache(num_blocks, block_size, kv_dtype=kv_dtype)
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.pool,
            max_running=max_batch,
            prefill_chunk=prefill_chunk,
            prefix_cache=prefix_cache,
        )
        if triton is None:
            triton = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
            if self.device.type == "cuda" and not triton:
                log.warning("triton is not installed: attention gathers blocks (slower)")
        self.invariant = deterministic
        if deterministic:
            make_invariant(model)
        self.forward = Forward(
            model,
            self.cache,
            max_context=info.max_context,
            max_batch=max_batch,
            graphs=cuda_graphs,
            triton=triton,
            invariant=deterministic,
        )
        self._keys = 0
        self._clean_since_oom = 0
        self.oom_count = 0
        self.prompt_tokens = 0
        self.peak_running = 0
        self.fatal: EngineFatalError | None = None

    # -- text <-> ids (the server calls these from its threads) ------------------------------

    def tokenize(
        self, text: str, *, truncation: bool = False, max_length: int | None = None
    ) -> list[int]:
        """The ids the model sees for `text` (those `generate` uses), optionally truncated."""
        return self.text.encode(text, truncation=truncation, max_length=max_length)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text for `ids`; raises InvalidRequestError for ids outside the vocabulary."""
        return self.text.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- scheduling -----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests holding cache memory now (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def busy(self) -> bool:
        """Whether any admitted request still waits for a step."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    @property
    def has_room(self) -> bool:
        """Whether `admit` should take another request now (the rest wait in the worker's
        bounded queue): while fewer than one batch waits for memory here."""
        return len(self.scheduler.waiting) < self.admit_limit

    @property
    def admit_limit(self) -> int:
        return self.scheduler.max_running

    @property
    def reused_tokens(self) -> int:
        return self.scheduler.reused_tokens

    def stats(self) -> dict[str, int]:
        """Counters for metrics and benchmarks."""
        pool = self.pool
        return {
            "running": self.running,
            "waiting": len(self.scheduler.waiting),
            "peak_running": self.peak_running,
            "admit_limit": self.admit_limit,
            "blocks_total": pool.capacity,
            "blocks_in_use": pool.in_use,
            "blocks_cached": pool.cached,
            "block_size": pool.block_size,
            "prompt_tokens": self.prompt_tokens,
            "reused_prompt_tokens": self.reused_tokens,
            "preemptions": self.scheduler.preemptions,
            "evictions": pool.evictions,
        }

    def warmup(self) -> None:
        """Allocate the KV cache and capture the decode graphs before the first request."""
        self.generate(GenerationRequest(prompt="warm up", max_new_tokens=2, temperature=0))
        with torch.no_grad():
            self.forward.capture_all()

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
        """Run one request to completion (tests, benchmarks, CLI; others may share its steps).

        Raises what the request failed with: InvalidRequestError if it cannot be served,
        EngineOverloadedError after a GPU out-of-memory, RequestCancelledError when
        `cancelled()` turned True between steps.
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
        """Queue `request` for the next steps; its outcome goes to `future`.

        A request that cannot be served (too long for the window) fails its future at once.
        """
        try:
            seq = self._new_sequence(request, future, cancelled or _never)
        except InvalidRequestError as exc:
            future.set_exception(exc)
            return
        except Exception as exc:  # a bug met before the request started: fail it alone
            log.exception("request failed before it started")
            future.set_exception(EngineInternalError.of(exc))
            return
        self.scheduler.add(seq)

    def step(self) -> None:
        """One step: admit what fits, prefill one packed chunk, decode every running sequence."""
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.cancelled():
                self._release(seq, RequestCancelledError("the request was cancelled"))
        plan = self.scheduler.plan()
        for seq in plan.preempted:
            log.info("preempted request %d (KV cache full); it will be recomputed", seq.key)
        self.peak_running = max(self.peak_running, self.running)
        if plan.prefill:
            self._guarded([seq for seq, _ in plan.prefill], lambda: self._run_prefill(plan.prefill))
        decoding = [seq for seq in plan.decode if not seq.future.done()]
        if decoding:
            self._guarded(decoding, lambda: self._run_decode(decoding))

    def _guarded(self, seqs: list[Running], work: Callable[[], None]) -> None:
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
                everyone = [*self.scheduler.waiting, *self.scheduler.running, *seqs]
                self._fail(everyone, error)
                raise error from exc
            log.exception("request failed inside the engine")
            self._fail(seqs, EngineInternalError.of(exc))
            return
        # Out of the except block, the traceback (and the activations its frames held) is gone,
        # so emptying the allocator's cache really returns that memory.
        self.oom_count += 1
        self._clean_since_oom = 0
        running = self.running
        self._fail(
            seqs,
            EngineOverloadedError(
                "the GPU ran out of memory for this request; retry later or shorten it"
            ),
        )
        # Admit fewer at once from now on: as many as ran without failing, at least one.
        limit = max(1, min(self.admit_limit, running) - 1)
        self.scheduler.max_running = limit
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning(
            "GPU out of memory (%d so far): %s; admitting at most %d requests at once now",
            self.oom_count,
            reason,
            limit,
        )

    def _fail(self, seqs: list[Running], error: BaseException) -> None:
        for seq in seqs:
            self._release(seq, error)

    def _release(self, seq: Running, outcome: Completion | BaseException) -> None:
        """Finish `seq`: give its blocks back and deliver its result or error."""
        self.scheduler.remove(seq)
        if seq.future.done():
            return
        if isinstance(outcome, BaseException):
            seq.future.set_exception(outcome)
            return
        seq.future.set_result(outcome)
        # After an out-of-memory, give back one request of concurrency per run of clean ones.
        self._clean_since_oom += 1
        if self.admit_limit < self.max_batch and self._clean_since_oom >= _RECOVER_AFTER:
            self.scheduler.max_running += 1
            self._clean_since_oom = 0

    # -- one request ----------------------------------------------------------------------------

    def _new_sequence(
        self, request: GenerationRequest, future: Future[Completion], cancelled
    ) -> Running:
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
        self._keys += 1
        self.prompt_tokens += len(prompt_ids)
        return Running(
            key=self._keys,
            request=request,
            prompt_ids=prompt_ids,
            stops=stops,
            detok=IncrementalDetokenizer(self.text.raw, context_ids=prompt_ids),
            eos_ids=self.eos_ids,
            generator=generator,
            future=future,
            cancelled=cancelled,
            started=time.perf_counter(),
            # A prompt that encodes to nothing still needs one position to predict from.
            ids=list(prompt_ids or [self.text.start_token()]),
        )

    def _run_prefill(self, work: list[tuple[Running, int]]) -> None:
        """One packed pass over the next `count` prompt tokens of each sequence."""
        chunks = []
        for seq, count in work:
            start = seq.computed
            ends = start + count == seq.target
            if seq.echo and not seq.scored:
                logits = "all"  # every prompt position is scored
            elif ends and not seq.scored:
                logits = "last"  # the first new token (not after a preemption: it has one)
            else:
                logits = "none"
            chunks.append(Chunk(seq.key, seq.ids[start : start + count], start, seq.table, logits))
        outputs = self.forward.prefill(chunks)
        finished: list[tuple[Running, torch.Tensor]] = []
        for (seq, count), chunk, logits in zip(work, chunks, outputs, strict=True):
            if seq.echo and not seq.scored and logits is not None:
                k = seq.request.top_k_per_token
                scores = prompt_scores(
                    seq.prompt_ids,
                    chunk.start,
                    logits,
                    k,
                    self.text.piece,
                    invariant=self.invariant,
                )
                seq.prompt_scores += scores
            self.scheduler.computed(seq, count)
            if seq.computed == seq.target and not seq.scored:
                finished.append((seq, logits))
        ready = []
        for seq, logits in finished:
            if seq.echo:
                pieces = token_pieces(self.text.raw, seq.prompt_ids)
                seq.echoed = echo_tokens(pieces, seq.prompt_scores)
            if seq.request.max_new_tokens == 0:
                seq.finish_reason = "prompt_only" if seq.echo else "length"
                self._release(seq, seq.finish())
            else:
                ready.append((seq, logits[-1:]))
        if ready:
            self._advance([seq for seq, _ in ready], torch.cat([x for _, x in ready]))

    def _run_decode(self, seqs: list[Running]) -> None:
        rows = [Row(seq.key, seq.ids[-1], seq.computed, seq.table) for seq in seqs]
        logits = self.forward.decode(rows)  # [n, V]
        for seq in seqs:
            self.scheduler.computed(seq, 1)
        self._advance(seqs, logits)

    def _advance(self, seqs: list[Running], logits: torch.Tensor) -> None:
        """Choose, score and record the next token of each of `seqs` from its logits [n, V]."""
        chosen = choose(logits, seqs)  # [n] on the device
        k = max(seq.request.top_k_per_token for seq in seqs)
        scored: list[Scored] = score(logits, chosen, k, self.text.piece, invariant=self.invariant)
        now = time.perf_counter()
        for seq, item in zip(seqs, scored, strict=True):
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.record(item.token_id, item)
            if seq.done:
                self._release(seq, seq.finish())


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
