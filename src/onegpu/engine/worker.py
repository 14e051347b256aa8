"""One thread owns the model: requests queue up and are served in order, off the event loop."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from onegpu.engine.types import Completion, EngineUnavailableError, GenerationRequest

log = logging.getLogger(__name__)

_STOP = object()


class EngineWorker:
    """Runs `engine.generate` on a dedicated thread; `submit` returns a Future.

    The queue is where a batching scheduler will later pick several requests per step; callers
    only see `submit`, so that change stays inside the engine.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="onegpu-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest) -> Future[Completion]:
        if not self.alive:
            raise EngineUnavailableError("the engine is shutting down")
        future: Future[Completion] = Future()
        self._queue.put((request, future))
        return future

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
            request, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.engine.generate(request))
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who maps it
                future.set_exception(exc)
