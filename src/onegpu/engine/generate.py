"""The engine: requests join a batch, share forward passes over a paged KV cache, and leave.

A step is three moves (`Engine.step`):
- schedule: `schedule.Scheduler` starts waiting requests whose blocks fit, reusing the cached
  blocks of any prompt prefix it has seen (`blocks`), and preempts when memory runs out;
- run: the prompts being started share one packed prefill pass, long ones in chunks, and every
  sequence past its prompt decodes one token (a CUDA graph per batch size; `forward`), or with
  the tokens it guessed to follow (`speculate`), all in one packed pass that verifies them;
- post-process: tokens are chosen and scored for the whole batch at once (`scoring`) and
  recorded per request (`sequence.Output`); finished requests give their blocks back and get
  their result.
On a GPU a plain decode step overlaps the next (`overlap`): its tokens stay on the device, the
next step's pass is launched from them, and only then is the step recorded, while the device
runs that pass. A step that needs the host's decisions first (a request to start, prefill or
cancel, a draft to verify, a block to find) lands the step in flight and runs the three moves in
order.
A failure in a pass fails the requests in it, not the engine; a GPU out-of-memory also makes the
scheduler run fewer requests at once for a while.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch

from onegpu.device import cuda_memory
from onegpu.engine.blocks import BlockPool
from onegpu.engine.config import EngineConfig, overlap_for, speculative_tokens_for
from onegpu.engine.failures import Guard
from onegpu.engine.forward import Chunk, Forward, Row
from onegpu.engine.kvcache import PagedKVCache
from onegpu.engine.schedule import Scheduler
from onegpu.engine.scoring import Scores, choose, choose_run, prompt_scores, score
from onegpu.engine.sequence import Output, Scored, log_done, start
from onegpu.engine.sequence import Sequence as Running
from onegpu.engine.speculate import Speculation
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


@dataclass(slots=True)
class _InFlight:
    """A plain decode step launched and not yet recorded: its sequences, the token chosen for
    each (ids on the device, which the next step may feed before they are read) and their
    scores, read when the step lands."""

    seqs: list[Running]
    chosen: torch.Tensor
    scores: Scores


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
        generation = getattr(model, "generation_config", None)
        self.text = Text(tokenizer, info.vocab_size, eos_ids(tokenizer, model.config, generation))
        scores = {"token_text": self.text.piece, "invariant": config.deterministic}
        self._score = partial(score, **scores)
        self._prompt_scores = partial(prompt_scores, **scores)
        self.cache = PagedKVCache(num_blocks, config.block_size, kv_dtype=config.kv_cache_dtype)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.pool,
            max_batch=config.max_batch,
            prefill_chunk=config.prefill_chunk,
            prefix_cache=config.prefix_cache,
        )
        drafted = speculative_tokens_for(config, self.device.type)
        self.forward = Forward(
            model,
            self.cache,
            max_context=info.max_context,
            max_batch=config.max_batch,
            graphs=config.cuda_graphs,
            triton=triton,
            invariant=config.deterministic,
            draft=drafted,
        )
        self._keys = 0
        self.speculation = Speculation(
            drafted,
            self.forward.verify_width,
            self.forward.verify_cost,
            sampled=config.speculate_sampled,
            always=config.speculate_always,
        )
        self.guard = Guard(self.scheduler, self._release)  # runs each pass, contains its failure
        self.overlap = overlap_for(config, self.device.type)
        self._in_flight: _InFlight | None = None
        self._verify_next = False  # drafts are worth verifying: land before the next step
        self.prompt_tokens = 0
        self.peak_running = 0
        self.overlapped = 0  # steps launched before the step in flight was recorded

    @property
    def fatal(self) -> EngineFatalError | None:
        """The GPU fault that ended this engine, if one did (readiness turns 503)."""
        return self.guard.fatal

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
        return bool(self.scheduler.running or self.scheduler.waiting or self._in_flight)

    @property
    def has_room(self) -> bool:
        """Whether `admit` should take another request now: while less than a batch waits."""
        return len(self.scheduler.waiting) < self.scheduler.batch_limit

    def stats(self) -> dict[str, int]:
        """Counters for metrics and benchmarks."""
        engine = {
            "running": self.running,
            "peak_running": self.peak_running,
            "overlapped_steps": self.overlapped,
        }
        counts = {"prompt_tokens": self.prompt_tokens} | self.speculation.stats()
        return engine | counts | self.scheduler.stats()

    def memory(self) -> dict[str, int]:
        """GPU memory in bytes (allocated now, peak, reserved, KV cache); empty on the CPU."""
        on_gpu = self.device.type == "cuda"
        return cuda_memory(self.device) | {"kv_cache": self.cache.nbytes()} if on_gpu else {}

    def warmup(self) -> None:
        """Allocate the KV cache and capture the decode graphs before the first request."""
        self.generate(GenerationRequest(prompt="warm up", max_new_tokens=2, temperature=0))
        with torch.no_grad():
            self.forward.capture_all()

    # -- requests -------------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None
    ) -> Completion:
        """Run one request to completion (tests, benchmarks); raises what it failed with."""
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
        """One step: schedule, run the prefill and the decode it planned, post-process; or,
        while a plain decode step is in flight, the next one overlapped with it (`_chain`)."""
        if self._in_flight is not None and self._chain():
            return
        self._land()
        self._verify_next = False
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.output.cancelled():
                self._release(seq, RequestCancelledError("the request was cancelled"))
        self.speculation.draft(self.scheduler.running)
        plan = self.scheduler.plan()
        for seq in plan.preempted:
            log.info("preempted request %d (KV cache full); it will be recomputed", seq.key)
        self.peak_running = max(self.peak_running, self.running)
        if plan.prefill:
            self.guard([seq for seq, _ in plan.prefill], lambda: self._prefill(plan.prefill))
        # Not those finished, failed or stepped back (an out-of-memory) in the prefill above.
        decoding = [seq for seq in plan.decode if seq.admitted and not seq.output.future.done()]
        if decoding:
            run = self._verify if any(seq.draft for seq in decoding) else self._decode
            self.guard(decoding, partial(run, decoding))

    # -- run ------------------------------------------------------------------------------------

    def _prefill(self, work: list[tuple[Running, int]]) -> None:
        """One packed pass over the next `count` prompt tokens of each sequence."""
        chunks = [_chunk(seq, count) for seq, count in work]
        ready = []
        outputs = self.forward.prefill(chunks)
        for (seq, count), chunk, logits in zip(work, chunks, outputs, strict=True):
            out = seq.output
            if chunk.logits == "all":  # an echoed prompt, scored as its chunks go by
                scores = self._prompt_scores(out.prompt_ids, chunk.start, logits, out.alternatives)
                out.prompt_scores.update(enumerate(scores, start=chunk.start + 1))
            self.scheduler.computed(seq, count)
            if seq.computed == seq.target and not seq.generated:
                if out.request.max_new_tokens == 0:
                    out.finish_reason = "prompt_only" if seq.echo else "length"
                    self._release(seq, out)
                else:
                    ready.append((seq, logits[-1:]))
        if ready:
            seqs = [seq for seq, _ in ready]
            self._advance(seqs, torch.cat([x for _, x in ready]), [1] * len(seqs))

    def _decode(self, seqs: list[Running]) -> None:
        rows = [Row(seq.key, [seq.ids[-1]], seq.computed, seq.table) for seq in seqs]
        logits = self.forward.decode(rows)  # [n, V]
        for seq in seqs:
            self.scheduler.computed(seq, 1)
        launched = self._launch(seqs, logits)
        if self.overlap:
            self._in_flight = launched
        else:
            self._record(launched)

    def _chain(self) -> bool:
        """Launch the next decode step of the sequences in flight, each fed the token chosen
        for it on the device, then land the step in flight while the device runs the new one.

        Not when the next step needs the host's decisions first: a request waits with room
        to start, is prefilling or was cancelled, drafts are worth verifying, or a position
        lacks a cache block and none is free. Then nothing is done: False. Those whose token
        in flight is their last by length get no row; those that end otherwise (a stop,
        end-of-text) waste theirs."""
        flight, scheduler = self._in_flight, self.scheduler
        if scheduler.waiting and len(scheduler.running) < scheduler.batch_limit:
            return False  # a request could start: in order
        if self._verify_next:
            return False
        in_flight = {seq.key for seq in flight.seqs}
        if any(seq.key not in in_flight for seq in scheduler.running):
            return False  # one is prefilling, or starts decoding: in order, all together
        if any(seq.output.cancelled() for seq in flight.seqs):
            return False
        going = [
            (index, seq)
            for index, seq in enumerate(flight.seqs)
            if not seq.output.future.done()
            and len(seq.output.scored) + 1 < seq.output.request.max_new_tokens
        ]
        if not going or not all(scheduler.extend(seq) for _, seq in going):
            return False
        seqs = [seq for _, seq in going]
        rows = [Row(seq.key, [index], seq.computed, seq.table) for index, seq in going]
        launched: list[_InFlight] = []

        def launch() -> None:
            logits = self.forward.decode(rows, chosen=flight.chosen)
            launched.append(self._launch(seqs, logits, ahead=1))

        self.guard(seqs, launch)
        self._land()
        if launched:
            self.overlapped += 1
            for seq in seqs:
                if not seq.output.future.done():  # its token in flight is in `ids` now
                    scheduler.computed(seq, 1)
            self._in_flight = launched[0]
        self._verify_next = self._drafts_worth_verifying()
        return True

    def _drafts_worth_verifying(self) -> bool:
        """With speculation: whether the running sequences' drafts are worth a verifying step
        now (the next step then lands the one in flight to draft from its tokens). Drafts not
        worth it are held back to be judged against what comes, as in a step in order."""
        if not self.speculation.k:
            return False
        running = self.scheduler.running
        self.speculation.draft(running)
        worth = any(seq.draft for seq in running)
        for seq in running:
            seq.draft = []
        return worth

    def _verify(self, seqs: list[Running]) -> None:
        """One packed pass over each sequence's last token and its draft (`speculate`); those
        without a draft decode their one token in it."""
        outputs = self.forward.verify(self.speculation.rows(seqs))  # [len(tokens), V] per row
        for seq in seqs:
            self.scheduler.computed(seq, 1)
        self._advance(seqs, torch.cat(outputs), [len(x) for x in outputs])

    # -- post-process ---------------------------------------------------------------------------

    def _launch(self, seqs: list[Running], logits: torch.Tensor, *, ahead: int = 0) -> _InFlight:
        """Choose each sequence's next token from its row of `logits` [n, V] and launch their
        scores, waiting for nothing (`ahead`: tokens each has in flight, see `choose`)."""
        chosen = choose(logits, [seq.output for seq in seqs], ahead=ahead)
        alternatives = max(seq.output.alternatives for seq in seqs)
        scores = Scores(logits, chosen, alternatives, invariant=self.config.deterministic)
        return _InFlight(seqs, chosen, scores)

    def _land(self) -> None:
        """Record the step in flight, if any."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            self.guard(flight.seqs, partial(self._record, flight))

    def _record(self, step: _InFlight) -> None:
        """Record a plain step's tokens, once the device has them: each sequence's, unless it
        ended before (a wasted row of an overlapped step)."""
        scored = step.scores.read(self.text.piece)
        for seq, item in zip(step.seqs, scored, strict=True):
            if not seq.output.future.done():
                self.speculation.observe(seq, item.token_id)
                self._take(seq, [item])

    def _advance(self, seqs: list[Running], logits: torch.Tensor, counts: list[int]) -> None:
        """Choose, score and record each sequence's new tokens from its `counts[i]` rows of
        `logits` [sum(counts), V]: one row, or a draft's positions and the one after them.

        Every position is chosen and scored before any draft is judged, so that a step waits
        for the device once, not once per drafted row."""
        if all(count == 1 for count in counts):  # one token each, chosen together
            self._record(self._launch(seqs, logits))
            return
        # A draft's run as `choose_run` picks it, the others as a plain step would.
        starts = list(accumulate(counts, initial=0))
        runs = [logits[starts[i] : starts[i + 1]] for i in range(len(seqs))]
        plain = [i for i, count in enumerate(counts) if count == 1]
        picked = {}
        if plain:
            rows = torch.cat([runs[i] for i in plain])
            chosen = choose(rows, [seqs[i].output for i in plain])
            picked = dict(zip(plain, chosen.split(1), strict=True))
        targets = torch.cat(
            [picked[i] if i in picked else choose_run(run, seqs[i].output)
             for i, run in enumerate(runs)]
        )  # fmt: skip
        scored = self._score(logits, targets, max(seq.output.alternatives for seq in seqs))
        for i, seq in enumerate(seqs):
            items = scored[starts[i] : starts[i + 1]]
            if counts[i] > 1:  # a draft: the accepted run, and one more
                items = items[: self.speculation.judge(seq, [item.token_id for item in items])]
            else:
                self.speculation.observe(seq, items[0].token_id)
            self._take(seq, items)

    def _take(self, seq: Running, items: list[Scored]) -> None:
        """Record `seq`'s new tokens in order, until one ends the request. All but the last
        are in the cache already (a verified draft), counted as they join `seq.ids`."""
        out = seq.output
        for index, item in enumerate(items):
            if index:
                self.scheduler.computed(seq, 1)
            if out.record(item.token_id, item):
                seq.ids.append(item.token_id)
            if out.done:
                self._release(seq, out)
                return

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
