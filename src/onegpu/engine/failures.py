"""What a failed forward pass means: the requests in it fail alone (a bug in serving them), the
engine runs fewer requests at once (the GPU ran out of memory), or the GPU is lost for good (a
CUDA fault poisons the context: the server must be restarted). `Guard` runs each pass and
applies that."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from onegpu.engine.schedule import Scheduler
from onegpu.engine.sequence import Sequence as Running
from onegpu.engine.types import (
    EngineError,
    EngineFatalError,
    EngineInternalError,
    EngineOverloadedError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Failure:
    kind: Literal["bug", "oom", "fatal"]
    error: EngineError  # what the requests in the pass get
    reason: str  # one line for the log


def classify(exc: Exception) -> Failure:
    """The kind of a failure raised by a forward pass, and the error its requests get."""
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        message = "the GPU ran out of memory for this request; retry later or shorten it"
        return Failure("oom", EngineOverloadedError(message), reason)
    if isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc)):
        return Failure("fatal", EngineFatalError(f"the GPU failed: {exc}"), reason)
    return Failure("bug", EngineInternalError.of(exc), reason)


class Guard:
    """Runs a pass for some sequences; a failure fails those requests, and only a GPU fault more.

    An out-of-memory fails a request only when it ran alone: a larger pass is retried with fewer
    requests at once, the youngest stepping back to be recomputed later (`Scheduler.back_off`).
    """

    def __init__(self, scheduler: Scheduler, release: Callable[[Running, Exception], None]):
        self.scheduler = scheduler
        self.release = release  # finish a sequence with an error
        self.oom_count = 0
        self.fatal: EngineFatalError | None = None

    def __call__(self, seqs: Sequence[Running], work: Callable[[], None]) -> None:
        try:
            with torch.no_grad():
                work()
            return
        except Exception as exc:
            failure = classify(exc)
            if failure.kind == "fatal":
                self.fatal = failure.error  # before any caller hears: readiness turns 503 first
                for seq in [*self.scheduler.waiting, *self.scheduler.running, *seqs]:
                    self.release(seq, failure.error)
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
            self.release(seq, failure.error)
