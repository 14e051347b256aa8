"""One thread owns the model: requests queue up and are served in order, off the event loop."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from onegpu.engine.types import (
    Completion,
    EngineError,
    EngineFatalError,
    EngineInternalError,
    EngineOverloadedError,
    EngineUnavailableError,
    GenerationRequest,
    RequestCancelledError,
)

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Ticket:
    """A submitted request: its result, and a flag the caller sets to give up on it."""

    future: Future[Completion] = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)


class EngineWorker:
    """Runs `engine.generate` on a dedicated thread; `submit` returns a Ticket.

    The queue is bounded: when `max_queue` requests wait already, `submit` refuses with
    EngineOverloadedError (a 503 with Retry-After) instead of letting memory grow. The queue is
    also where a batching scheduler will later pick several requests per step; callers only see
    `submit`, so that change stays inside the engine.
    """

    def __init__(self, engine, *, max_queue: int = 256) -> None:
        self.engine = engine
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self.fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="onegpu-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed and self.fatal is None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest) -> Ticket:
        if not self.alive:
            raise EngineUnavailableError("the engine is not running")
        ticket = Ticket()
        try:
            self._queue.put_nowait((request, ticket))
        except queue.Full:
            raise EngineOverloadedError(
                f"the queue is full ({self._queue.maxsize} requests waiting); retry later"
            ) from None
        return ticket

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            request, ticket = item
            if ticket.cancel.is_set():
                ticket.future.set_exception(
                    RequestCancelledError("the request was cancelled before it started")
                )
                continue
            ticket.future.set_running_or_notify_cancel()
            try:
                ticket.future.set_result(
                    self.engine.generate(request, cancelled=ticket.cancel.is_set)
                )
            except EngineFatalError as exc:
                # The device is unusable: fail this request, refuse the rest (readiness turns
                # 503 so an orchestrator restarts us), and log the traceback once.
                log.exception("engine failed; marking the server not ready")
                self.fatal = exc
                ticket.future.set_exception(exc)
                self._drain(exc)
                return
            except EngineError as exc:
                ticket.future.set_exception(exc)
            except Exception as exc:
                log.exception("request failed inside the engine")
                ticket.future.set_exception(
                    EngineInternalError(f"internal engine error ({type(exc).__name__})")
                )

    def _drain(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].future.set_exception(EngineUnavailableError(f"engine failed: {exc}"))
