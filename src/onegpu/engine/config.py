"""What the engine is built from: a plain frozen dataclass, no torch, no pydantic.

Its defaults are the engine's defaults; `onegpu.settings.ServeSettings` describes each field for
people (flag, environment variable, help) and converts into this class in one method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The choices of the dtype settings: the flags, the variables and the engine read these.
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
KvCacheDtype = Literal["auto", "int8"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What to load and where. `model=None` means the embedded default (SmolLM2-135M)."""

    model: str | None = None
    revision: str | None = None
    adapter: str | None = None
    device: str = "auto"
    dtype: Dtype = "auto"
    gpu_memory_gib: float | None = None
    max_context: int = 2048
    default_stop: tuple[str, ...] = ("\n\n",)
    trust_remote_code: bool = False
    max_batch: int = 32
    cuda_graphs: bool = True
    fuse: bool = True
    kv_cache_dtype: KvCacheDtype = "auto"
    block_size: int = 16
    # Measured on an H200 with a 14B-shaped model: the 1-token multiple-choice scenarios ran
    # 1.2x faster than with 512 (fewer passes, each fuller), at the price of decode steps
    # waiting for up to 2,048 prompt tokens.
    prefill_chunk: int = 2048
    prefix_cache: bool = True
    # 8-bit Marlin layers run large prefill passes on fp16 weights dequantized per pass, with
    # cuBLAS (dense_prefill.py; one buffer as large as the largest layer's weight).
    dense_prefill: bool = True
    # Batch-invariant kernels: a greedy answer bit-identical whatever shares its batch.
    deterministic: bool = False
    # Prompt-lookup speculation: tokens drafted per decode row (0: off).
    # None: SPECULATIVE_TOKENS_CUDA on a CUDA GPU, 0 on the CPU (`speculative_tokens_for`).
    speculative_tokens: int | None = None
    # Sampled requests draft too (greedy ones only when off). Off: the one GPU mix that drafted
    # them (H200, random weights, which never keep a sampled draft) ran the summaries 4.8 s
    # against 3.1 s without; the win real text projects is not measured on a GPU.
    speculate_sampled: bool = False
    # Verify every draft, even when the requests' earlier drafts say it will not pay
    # (`speculate.worth_verifying`): for tests and for measuring what drafts keep.
    speculate_always: bool = False
    # Launch a decode step before recording the one in flight, its tokens taken on the device:
    # the host's turn (scoring, recording, staging the next pass) overlaps the device's pass.
    # None: on a CUDA GPU, off on the CPU (where nothing runs beside the host: no gain, and a
    # wasted pass each time a request ends).
    overlap: bool | None = None


# On an H100 a decode row of 5 positions cost 1.08x a row of one, and 10 rows of 4 positions
# (forward.verify_width) 1.30x, while real GSM8K answers (Qwen2.5-0.5B) kept 1.9-2.4 tokens per
# verifying pass: 1.75x projected at batch 1. On 2 CPU cores a wider pass costs what it
# computes, and batch 1 ran 0.74x: off there.
SPECULATIVE_TOKENS_CUDA = 4


def speculative_tokens_for(config: EngineConfig, device_type: str) -> int:
    """Tokens drafted per decode row for an engine on `device_type` ("cuda", "cpu", ...)."""
    if config.speculative_tokens is not None:
        return config.speculative_tokens
    return SPECULATIVE_TOKENS_CUDA if device_type == "cuda" else 0


def overlap_for(config: EngineConfig, device_type: str) -> bool:
    """Whether an engine on `device_type` overlaps a decode step's recording with the next."""
    return config.overlap if config.overlap is not None else device_type == "cuda"


# Rows from which a prefill pass runs on dequantized weights (dense_prefill.py). H100, 14B-shaped
# 8-bit, one chunk (bench/step_cost.py): 512 tokens 54.7 -> 45.1 ms, 1,024 107.1 -> 71.4, 2,048
# 219.0 -> 129.7. The gain shrinks by ~26 ms per 512 rows fewer: 256 about even (not measured).
DENSE_MIN_ROWS = 512
