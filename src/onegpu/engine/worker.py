"""One thread owns the model: it hands queued requests to the engine and steps the batch."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from onegpu.engine.types import (
    Completion,
    EngineFatalError,
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
    """Drives the engine on a dedicated thread; `submit` returns a Ticket.

    Between steps, queued requests move to the engine while it has room (it starts them as KV
    memory allows); the rest wait here in arrival order. The queue is bounded: when `max_queue`
    requests wait already, `submit` refuses with EngineOverloadedError (a 503 with Retry-After)
    instead of letting memory grow.
    """

    def __init__(self, engine, *, max_queue: int) -> None:
        self.engine = engine
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="onegpu-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        failed = getattr(self.engine, "fatal", None) is not None
        return self._thread.is_alive() and not self._closed and not failed

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
        stopping = False
        while True:
            try:
                stopping = self._admit(block=not stopping) or stopping
                if self.engine.busy:
                    self.engine.step()
                elif stopping:
                    return
            except EngineFatalError as exc:
                # The device is unusable (the engine failed its running requests already):
                # refuse the rest, turn readiness 503 so an orchestrator restarts us, and log
                # the traceback once.
                log.exception("engine failed; marking the server not ready")
                self._drain(exc)
                return

    def _admit(self, *, block: bool) -> bool:
        """Move queued requests to the engine; True once the stop marker was taken.

        Waits for the first request only when nothing runs (`block` and an idle engine).
        """
        wait = block and not self.engine.busy
        while self.engine.has_room:
            try:
                item = self._queue.get(block=wait)
            except queue.Empty:
                return False
            wait = False
            if item is _STOP:
                return True
            request, ticket = item
            if ticket.cancel.is_set():
                ticket.future.set_exception(
                    RequestCancelledError("the request was cancelled before it started")
                )
                continue
            ticket.future.set_running_or_notify_cancel()
            self.engine.admit(request, ticket.future, cancelled=ticket.cancel.is_set)
        return False

    def _drain(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].future.set_exception(EngineUnavailableError(f"engine failed: {exc}"))
