"""LoRA adapters for the served model: data formatting, the training loop, adapter output.

    from onegpu.train import train
    train("out/qwen14b-gptq8", ["oasst1", "dolly:0.5"], "out/adapter", packing=True)

Modules: `sources` (instruction sets and JSONL -> conversations, mixing), `format` (templates,
reply-only labels), `batching` (padding, packing without cross-attention), `model` (every peft /
GPTQModel / bitsandbytes call: bases, LoRA, merging), `loop` (optimizer, schedule, loss,
checkpoints), `run` (`train(...)`, the run record), `command` (`onegpu train`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["merge", "train"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `onegpu --help` does not import torch.
    if name in __all__:
        from onegpu.train import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
