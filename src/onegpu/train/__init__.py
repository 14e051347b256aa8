"""LoRA adapters for the served model: data formatting, the training loop, adapter output.

    from onegpu.settings import TrainSettings
    from onegpu.train import train
    train(TrainSettings(model="out/qwen14b-gptq8", data=["oasst1", "dolly:0.5"],
                        output="out/adapter", packing=True))

Modules: `sources` (instruction sets and JSONL -> conversations, mixing), `format` (templates,
reply-only labels), `batching` (padding, packing without cross-attention), `model` (every peft /
GPTQModel / bitsandbytes call: bases, LoRA, merging), `loop` (`fit`: optimizer, schedule, loss,
checkpoints), `job` (`train(settings)` in phases, the run record; `merge`). `onegpu train` is
`onegpu.cli.train`; "a run" is one call of `train`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["merge", "train"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `onegpu --help` does not import torch.
    if name in __all__:
        from onegpu.train import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
