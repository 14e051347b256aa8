"""The engine: requests join a batch, share forward passes over a paged KV cache, and leave.

A step is three moves (`Engine.step`):
- schedule: `schedule.Scheduler` starts waiting requests whose blocks fit, reusing the cached
  blocks of any prompt prefix it has seen (`blocks`), and preempts when memory runs out;
- run: the prompts being started share one packed prefill pass, long ones in chunks, and every
  sequence past its prompt decodes one token (a CUDA graph per batch size; `forward`);
- post-process: tokens are chosen and scored for the whole batch at once (`scoring`) and
  recorded per request (`sequence.Output`); finished requests give their blocks back and get
  their result.
A failure in a pass fails the requests in it, not the engine; a GPU out-of-memory also makes the
scheduler run fewer requests at once for a while.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from onegpu.device import cuda_memory
from onegpu.engine.blocks import BlockPool
from onegpu.engine.config import EngineConfig
from onegpu.engine.failures import classify
from onegpu.engine.forward import Chunk, Forward, Row
from onegpu.engine.invariant import make_invariant
from onegpu.engine.kvcache import PagedKVCache
from onegpu.engine.schedule import Scheduler
from onegpu.engine.scoring import choose, prompt_scores, score
from onegpu.engine.sequence import Output, log_done, start
from onegpu.engine.sequence import Sequence as Running
from onegpu.engine.text import Text, eos_ids
from onegpu.engine.types import (
    Completion,
    EngineFatalError,
    EngineInternalError,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    RequestCancelledError,
)

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


class Engine:
    """A loaded causal LM and its tokenizer, running up to `config.max_batch` requests at once
    over a pool of `num_blocks` KV blocks of `config.block_size` positions.

    One thread drives it (`admit`, `step`; see `EngineWorker`), or `generate` runs a single
    request to completion. `tokenize` and `decode` are safe from any thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig,
        *,
        info: ModelInfo,
        num_blocks: int,
        triton: bool | None = None,
    ) -> None:
        self.model = model
        self.info = info
        self.config = config
        self.device = torch.device(info.device)
        block = config.block_size
        generation = getattr(model, "generation_config", None)
        self.text = Text(tokenizer, info.vocab_size, eos_ids(tokenizer, model.config, generation))
        self.cache = PagedKVCache(num_blocks, block, kv_dtype=config.kv_cache_dtype)
        self.pool = BlockPool(num_blocks, block)
        self.scheduler = Scheduler(
            self.pool,
            max_batch=config.max_batch,
            prefill_chunk=config.prefill_chunk,
            prefix_cache=config.prefix_cache,
        )
        if config.deterministic:
            make_invariant(model)
        self.forward = Forward(
            model,
            self.cache,
            max_context=info.max_context,
            max_batch=config.max_batch,
            graphs=config.cuda_graphs,
            triton=triton,
            invariant=config.deterministic,
        )
        self._keys = 0
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

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a conversation, by the tokenizer's chat template."""
        return self.text.chat(messages)

    # -- state ----------------------------------------------------------------------------------

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
        return len(self.scheduler.waiting) < self.scheduler.batch_limit

    def stats(self) -> dict[str, int]:
        """Counters for metrics and benchmarks."""
        engine = {"running": self.running, "peak_running": self.peak_running}
        return engine | {"prompt_tokens": self.prompt_tokens} | self.scheduler.stats()

    def memory(self) -> dict[str, int]:
        """GPU memory in bytes (allocated now, peak, reserved, KV cache); empty on the CPU."""
        if self.device.type != "cuda":
            return {}
        return cuda_memory(self.device) | {"kv_cache": self.cache.nbytes()}

    def warmup(self) -> None:
        """Allocate the KV cache and capture the decode graphs before the first request."""
        self.generate(GenerationRequest(prompt="warm up", max_new_tokens=2, temperature=0))
        with torch.no_grad():
            self.forward.capture_all()

    # -- requests -------------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None
    ) -> Completion:
        """Run one request to completion (tests, benchmarks, CLI; others may share its steps);
        raises what it failed with (InvalidRequestError, EngineOverloadedError, ...)."""
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
        """Queue `request` for the next steps; its outcome goes to `future` (at once for one
        that cannot be served, such as a prompt too long for the window)."""
        try:
            if request.prompt_ids is not None:
                prompt_ids = self.text.checked(request.prompt_ids)
            else:
                prompt_ids = self.tokenize(request.prompt)
            seq = start(
                self._keys + 1,
                request,
                prompt_ids,
                text=self.text,
                default_stop=self.config.default_stop,
                max_context=self.info.max_context,
                device=self.device,
                future=future,
                cancelled=cancelled or _never,
            )
        except InvalidRequestError as exc:
            future.set_exception(exc)
            return
        except Exception as exc:  # a bug met before the request started: fail it alone
            log.exception("request failed before it started")
            future.set_exception(EngineInternalError.of(exc))
            return
        self._keys += 1
        self.prompt_tokens += len(prompt_ids)
        self.scheduler.add(seq)

    def step(self) -> None:
        """One step: schedule, run the prefill and the decode it planned, post-process."""
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.output.cancelled():
                self._release(seq, RequestCancelledError("the request was cancelled"))
        plan = self.scheduler.plan()
        for seq in plan.preempted:
            log.info("preempted request %d (KV cache full); it will be recomputed", seq.key)
        self.peak_running = max(self.peak_running, self.running)
        if plan.prefill:
            self._guarded([seq for seq, _ in plan.prefill], lambda: self._prefill(plan.prefill))
        # Not those finished, failed or stepped back (an out-of-memory) in the prefill above.
        decoding = [seq for seq in plan.decode if seq.admitted and not seq.output.future.done()]
        if decoding:
            self._guarded(decoding, lambda: self._decode(decoding))

    # -- run ------------------------------------------------------------------------------------

    def _prefill(self, work: list[tuple[Running, int]]) -> None:
        """One packed pass over the next `count` prompt tokens of each sequence."""
        chunks = [_chunk(seq, count) for seq, count in work]
        ready = []
        outputs = self.forward.prefill(chunks)
        for (seq, count), chunk, logits in zip(work, chunks, outputs, strict=True):
            out = seq.output
            if chunk.logits == "all":
                k = out.request.top_k_per_token
                invariant = self.config.deterministic
                scores = prompt_scores(
                    out.prompt_ids, chunk.start, logits, k, self.text.piece, invariant=invariant
                )
                out.prompt_scores.update(enumerate(scores, start=chunk.start + 1))
            self.scheduler.computed(seq, count)
            if seq.computed == seq.target and not seq.generated:
                if out.request.max_new_tokens == 0:
                    out.finish_reason = "prompt_only" if seq.echo else "length"
                    self._release(seq, out)
                else:
                    ready.append((seq, logits[-1:]))
        if ready:
            self._advance([seq for seq, _ in ready], torch.cat([x for _, x in ready]))

    def _decode(self, seqs: list[Running]) -> None:
        rows = [Row(seq.key, seq.ids[-1], seq.computed, seq.table) for seq in seqs]
        logits = self.forward.decode(rows)  # [n, V]
        for seq in seqs:
            self.scheduler.computed(seq, 1)
        self._advance(seqs, logits)

    # -- post-process ---------------------------------------------------------------------------

    def _advance(self, seqs: list[Running], logits: torch.Tensor) -> None:
        """Choose, score and record the next token of each of `seqs` from its logits [n, V]."""
        outputs = [seq.output for seq in seqs]
        chosen = choose(logits, outputs)  # [n] on the device
        k = max(out.request.top_k_per_token for out in outputs)
        scored = score(logits, chosen, k, self.text.piece, invariant=self.config.deterministic)
        for seq, out, item in zip(seqs, outputs, scored, strict=True):
            if out.record(item.token_id, item):
                seq.ids.append(item.token_id)
            if out.done:
                self._release(seq, out)

    def _release(self, seq: Running, outcome: Output | BaseException) -> None:
        """Finish `seq`: give its blocks back and deliver its result (or error)."""
        self.scheduler.remove(seq)
        future = seq.output.future
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
            return
        completion = outcome.finish(self.text.raw)
        log_done(completion, reused=seq.reused, request_id=outcome.request.request_id)
        future.set_result(completion)
        self.scheduler.finished()

    def _guarded(self, seqs: list[Running], work: Callable[[], None]) -> None:
        """Run `work` for `seqs`; a failure fails those requests, and only a GPU fault more.

        An out-of-memory fails a request only when it ran alone: a larger pass is retried with
        fewer requests at once, the youngest stepping back to be recomputed later.
        """
        try:
            with torch.no_grad():
                work()
            return
        except Exception as exc:
            failure = classify(exc)
            if failure.kind == "fatal":
                self.fatal = failure.error  # before any caller hears: readiness turns 503 first
                for seq in [*self.scheduler.waiting, *self.scheduler.running, *seqs]:
                    self._release(seq, failure.error)
                raise failure.error from exc
            if failure.kind == "bug":
                log.exception("request failed inside the engine")
        # Out of the except block, the traceback (and the activations its frames held) is gone,
        # so emptying the allocator's cache really returns that memory.
        if failure.kind == "oom":
            self.oom_count += 1
            preempted = self.scheduler.back_off()
            log.warning(
                "GPU out of memory (%d so far): %s; %d at once from now on, %d stepped back",
                self.oom_count, failure.reason, self.scheduler.batch_limit, len(preempted),
            )  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(seqs) > 1:
                return  # the pass is retried with fewer: only a request alone fails for memory
        for seq in seqs:
            self._release(seq, failure.error)


def _chunk(seq: Running, count: int) -> Chunk:
    """The next `count` prompt positions of `seq` as a prefill chunk, with the logits it needs:
    every position for an echo request's prompt (scored token by token), the last one where
    the prompt ends (its first new token; not after a preemption, which has it), else none."""
    if seq.generated:
        logits = "none"
    elif seq.echo:
        logits = "all"
    else:
        logits = "last" if seq.computed + count == seq.target else "none"
    tokens = seq.ids[seq.computed : seq.computed + count]
    return Chunk(seq.key, tokens, seq.computed, seq.table, logits)
