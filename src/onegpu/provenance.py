"""What an artifact records about how it was made: `onegpu.json`, written by quantize and train.

A record holds the job's own sections (base model, settings, data, results) and, from here, when it
was made, the library versions, each phase's seconds and peak GPU memory, and peak host memory.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RECORD_FILE = "onegpu.json"


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Python's version, each named distribution's (None when absent) and torch's CUDA."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Phases:
    """The named phases of one run of a job: seconds and peak GPU memory (CUDA only) of each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak_gpu_bytes: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            if cuda:
                self.peak_gpu_bytes[name] = torch.cuda.max_memory_allocated(self.device)

    def summary(self) -> dict[str, Any]:
        """The record's `timings_s` (each phase and the total) and `memory` sections."""
        total = round(time.perf_counter() - self.started, 3)
        return {
            "timings_s": self.seconds | {"total": total},
            "memory": {
                "peak_gpu_bytes": dict(self.peak_gpu_bytes) or None,
                "peak_host_rss_bytes": peak_rss_bytes(),
            },
        }


def new_record(kind: str, **sections: Any) -> dict[str, Any]:
    """A record's skeleton: its kind (`gptq`, `lora`), when it was made, the job's sections."""
    return {"format": kind, "created": datetime.now(UTC).isoformat(timespec="seconds"), **sections}


def write_record(
    folder: Path, record: dict[str, Any], phases: Phases, libraries: Iterable[str]
) -> None:
    """Write `record` with the library versions and the phases so far as `folder/onegpu.json`."""
    full = record | {"libraries": library_versions(libraries)} | phases.summary()
    (Path(folder) / RECORD_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
