"""Where a job computes and in what precision: one reading of `--device`, `--dtype` and
`--gpu-memory-gib` for serve, quantize and train.

Each job states its own CUDA default dtype where it calls `resolve_dtype`; on the CPU every job
computes in float32.
"""

from __future__ import annotations

import logging

import torch

from onegpu.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DeviceError(UserError):
    """The device or dtype asked for does not exist on this machine."""


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but CUDA is not available: use cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, *, cuda_default: torch.dtype) -> torch.dtype:
    """`auto` is `cuda_default` on a GPU and float32 on the CPU; otherwise a name of `DTYPES`."""
    if dtype == "auto":
        return cuda_default if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DeviceError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def cuda_index(device: torch.device) -> int:
    """The CUDA device number `device` means (`cuda` alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def cap_gpu_memory(device: torch.device, gib: float | None) -> None:
    """Limit this process to `gib` of the GPU's memory (emulates a smaller card, e.g. 24 GB)."""
    if gib is None or device.type != "cuda":
        return
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    fraction = min(1.0, gib / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    log.info("GPU memory capped at %.1f GiB of %.1f GiB (fraction %.3f)", gib, total, fraction)


def cuda_memory(device: torch.device) -> dict[str, int]:
    """The allocator's bytes on `device`: allocated now, peak since start, reserved."""
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "peak": torch.cuda.max_memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
    }
