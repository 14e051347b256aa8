"""What a failed forward pass means: the requests in it fail alone (a bug in serving them), the
engine runs fewer requests at once (the GPU ran out of memory), or the GPU is lost for good (a
CUDA fault poisons the context: the server must be restarted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from onegpu.engine.types import (
    EngineError,
    EngineFatalError,
    EngineInternalError,
    EngineOverloadedError,
)


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
