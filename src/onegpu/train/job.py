"""`train(settings) -> Path`: data to a served adapter, with a run record beside it.

A run reads as its phases: prepare (read and mix the data sources, load the base, tokenize and
batch) -> fit (LoRA weights through `loop.fit`, which also measures the held-out loss before the
first step and after the last) -> record (`onegpu.json`) -> merge, when asked.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from onegpu.device import resolve_device
from onegpu.errors import OutputExistsError
from onegpu.provenance import RECORD_FILE, Phases, new_record, write_record
from onegpu.settings import TrainSettings
from onegpu.train import model as tm
from onegpu.train.batching import Batch, make_batches
from onegpu.train.format import TEMPLATES, TokenizedExample, special_prefix, tokenize
from onegpu.train.loop import CHECKPOINTS, History, LoopConfig, fit, latest_checkpoint
from onegpu.train.sources import Conversation, DataError, SourceCounts, SourceSpec, load_source, mix

log = logging.getLogger(__name__)

LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "accelerate",
    "gptqmodel",
    "bitsandbytes",
    "datasets",
    "onegpu",
)


@dataclass
class _Data:
    """The prepared data: what the loop reads, and what the record says about it."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    counts: list[SourceCounts]
    epoch_batches: Callable[[int], list[Batch]]  # epoch -> its micro-batches, in order
    eval_batches: list[Batch]

    @property
    def per_epoch(self) -> int:
        return len(self.epoch_batches(0))


def train(settings: TrainSettings) -> Path:
    """Train a LoRA adapter on `settings.model` and write it to `settings.output` (peft folder).

    `model`: an 8-bit GPTQ checkpoint from `onegpu quantize` (LoRA on the quantized base), or a
    16-bit model, trained as it is or loaded in 4-bit NF4 with `quantization="nf4"` (QLoRA, CUDA).
    `data`: source names (oasst1, lima, arc-challenge, arc-easy, dolly, platypus) or .jsonl files,
    each optionally `:WEIGHT` (0.5 = a random half, 2 = twice). Replies are rendered with
    `template` (qa, alpaca, chatml, plain); only reply tokens are learned; examples are cut to
    `max_length` tokens and, with `packing`, several share a row without seeing each other.
    `eval_fraction` of each source (at most `max_eval_examples` in all) is held out for eval loss.

    One optimizer step sees `batch_size * grad_accum` rows; training runs `epochs` over the data or
    `max_steps` steps, with `warmup_ratio` of them warming up and a cosine decay to
    `min_lr_ratio * lr`. `optimizer` "auto" is paged 8-bit AdamW with bitsandbytes on CUDA, else
    torch's AdamW. Checkpoints every `save_every` steps let `resume` continue an interrupted
    run. `gpu_memory_gib` caps GPU memory (24 behaves like an RTX 4090).

    With `merge_base` (the 16-bit model the base was quantized from), the adapter is also folded
    into it and saved at `merge_output`; quantize that with `onegpu quantize` to serve one model.

    Returns `output`, holding adapter_config.json, adapter_model.safetensors and onegpu.json (the
    run record: settings, data counts, versions, timings, losses).
    """
    output = Path(settings.output)
    _prepare_output(output, resume=settings.resume, overwrite=settings.overwrite)
    phases = Phases(resolve_device(settings.device))
    with phases("data"):  # first, so that bad data fails before a model loads
        sources = _read_sources(settings.data)
    with phases("load"):
        base = tm.load_base(
            settings.model,
            quantization=settings.quantization,
            device=settings.device,
            dtype=settings.dtype,
            revision=settings.revision,
            attn_implementation=settings.attn_implementation,
            gradient_checkpointing=settings.gradient_checkpointing,
            gpu_memory_gib=settings.gpu_memory_gib,
            trust_remote_code=settings.trust_remote_code,
        )
    with phases("tokenize"):
        data = _prepare_data(sources, base.tokenizer, settings)
    cfg = _loop_config(settings, data.per_epoch)
    log.warning(
        "data: %d train examples (%d micro-batches per epoch), %d eval; %d optimizer steps",
        len(data.train),
        data.per_epoch,
        len(data.eval),
        cfg.steps,
    )

    with phases("train"):
        peft_model, history = _fit_adapter(base, data, cfg, settings, output)

    record = _record(settings, base, peft_model, data, cfg, history)
    write_record(output, record, phases, LIBRARIES)
    first, last = history.eval[:1], history.eval[-1:]
    if first and last:
        log.warning("eval loss %.4f -> %.4f", first[0]["loss"], last[0]["loss"])
    log.warning("adapter written to %s", output)

    if settings.merge_base is not None:
        del peft_model, base
        merged_to = merge(output, settings.merge_base, settings.merged_to)
        record["merged"] = {"base": str(settings.merge_base), "output": str(merged_to)}
        write_record(output, record, phases, LIBRARIES)
        log.warning("merged model written to %s: run `onegpu quantize` on it to serve", merged_to)
    return output


def _fit_adapter(base, data, cfg, settings: TrainSettings, output: Path):
    """LoRA on `base`, trained by the loop and saved in `output`: (the peft model, history)."""
    torch.manual_seed(settings.seed)  # LoRA's A matrices start random
    peft_model = tm.add_lora(
        base.model,
        r=settings.lora_r,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
    )
    history = fit(
        peft_model,
        data.epoch_batches,
        data.eval_batches,
        cfg,
        device=base.device,
        output=output,
        resume=settings.resume,
        progress=settings.progress,
    )
    tm.save_adapter(peft_model, output)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    return peft_model, history


def merge(adapter: str | Path, base: str | Path, output: str | Path, **kwargs: Any) -> Path:
    """Fold a trained adapter into its 16-bit base model and save the result at `output`."""
    return tm.merge_adapter(Path(adapter), base, Path(output), **kwargs)


def _prepare_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a folder")
    if overwrite:
        shutil.rmtree(output, ignore_errors=True)
    elif (output / RECORD_FILE).exists():
        raise OutputExistsError(
            f"{output} already holds a trained adapter: pass --overwrite to train again"
        )
    elif latest_checkpoint(output) is not None and not resume:
        raise OutputExistsError(
            f"{output} holds checkpoints of an unfinished run: pass --resume to continue it "
            "or --overwrite to start again"
        )
    elif output.exists() and not resume and any(p.name != CHECKPOINTS for p in output.iterdir()):
        raise OutputExistsError(f"{output} exists and is not empty: pass --overwrite to replace it")
    output.mkdir(parents=True, exist_ok=True)


def _read_sources(data: list[str]) -> list[tuple[SourceSpec, list[Conversation], dict[str, Any]]]:
    """Each source's spec, conversations and a description of where they came from."""
    out = []
    for text in data:
        spec = SourceSpec.parse(text)
        conversations, where = load_source(spec)
        out.append((spec, conversations, where))
    return out


def _prepare_data(
    sources: list[tuple[SourceSpec, list[Conversation], dict[str, Any]]],
    tokenizer: Any,
    settings: TrainSettings,
) -> _Data:
    """Split and mix the sources, tokenize with the template, and batch (packed or padded)."""
    train_convs, eval_convs, counts = mix(
        [(spec, conversations) for spec, conversations, _ in sources],
        eval_fraction=settings.eval_fraction,
        max_eval=settings.max_eval_examples,
        seed=settings.seed,
    )
    prefix = special_prefix(tokenizer)
    template = TEMPLATES[settings.template]

    def tokenized(convs: list[Conversation], desc: str):
        out, dropped = [], Counter()
        quiet = not settings.progress or len(convs) < 1000
        for conv in tqdm(convs, desc=desc, unit="ex", disable=quiet):
            example = tokenize(
                conv, tokenizer, template, max_length=settings.max_length, prefix=prefix
            )
            if example is None:
                dropped[conv.source] += 1
            else:
                out.append(example)
        return out, dropped

    train_examples, train_dropped = tokenized(train_convs, "tokenizing train")
    eval_examples, _ = tokenized(eval_convs, "tokenizing eval")
    if not train_examples:
        raise DataError(
            f"no training example has a reply token within max_length={settings.max_length}"
        )
    described = {spec.name: where for spec, _, where in sources}
    for c in counts:
        c.detail = {**described.get(c.name, {}), "dropped_too_long": train_dropped[c.name]}

    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    batching = {
        "pad_id": 0 if pad_id is None else pad_id,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "packing": settings.packing,
    }

    @lru_cache(maxsize=1)
    def epoch_batches(epoch: int) -> list[Batch]:
        return make_batches(train_examples, seed=settings.seed + epoch, **batching)

    eval_batches = make_batches(eval_examples, seed=None, **batching)
    return _Data(train_examples, eval_examples, counts, epoch_batches, eval_batches)


def _loop_config(settings: TrainSettings, per_epoch: int) -> LoopConfig:
    steps = settings.max_steps or max(
        1, math.ceil(settings.epochs * per_epoch / settings.grad_accum)
    )
    return LoopConfig(
        steps=steps,
        grad_accum=settings.grad_accum,
        lr=settings.lr,
        min_lr_ratio=settings.min_lr_ratio,
        warmup_steps=round(settings.warmup_ratio * steps),
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optimizer=settings.optimizer,
        neftune_alpha=settings.neftune_alpha,
        eval_every=settings.eval_every,
        save_every=settings.save_every,
        keep_checkpoints=settings.keep_checkpoints,
        seed=settings.seed,
    )


def _record(
    settings: TrainSettings,
    base: tm.TrainBase,
    peft_model: Any,
    data: _Data,
    cfg: LoopConfig,
    history: History,
) -> dict[str, Any]:
    return new_record(
        "lora",
        base_model={
            "path": str(settings.model),
            "revision": settings.revision,
            **base.describe(),
            "quantized_from": _quantized_from(settings.model),
        },
        adapter={
            "r": settings.lora_r,
            "alpha": settings.lora_alpha,
            "dropout": settings.lora_dropout,
            "target_modules": list(settings.target_modules),
            "trainable_parameters": sum(p.numel() for p in tm.trainable_parameters(peft_model)),
        },
        data={
            "sources": [asdict(c) for c in data.counts],
            "template": settings.template,
            "max_length": settings.max_length,
            "packing": settings.packing,
            "neftune_alpha": settings.neftune_alpha,
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
            "eval_fraction": settings.eval_fraction,
            "micro_batches_per_epoch": data.per_epoch,
            "train_tokens_per_epoch": sum(len(e) for e in data.train),
            "train_targets_per_epoch": sum(e.n_targets for e in data.train),
        },
        training={
            **asdict(cfg),
            "epochs": settings.epochs if settings.max_steps is None else None,
            "max_steps": settings.max_steps,
            "batch_size": settings.batch_size,
            "warmup_ratio": settings.warmup_ratio,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "attn_implementation": settings.attn_implementation,
            "optimizer_used": history.optimizer,
            "resumed_from_step": history.resumed_from,
            "gpu_memory_gib": settings.gpu_memory_gib,
        },
        losses={"train": history.train, "eval": history.eval},
        merged=None,
    )


def _quantized_from(model: str | Path) -> dict[str, Any] | None:
    """The base's own metadata from `onegpu quantize` (what it was quantized from), if local."""
    meta = Path(model) / RECORD_FILE
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return {"base_model": info.get("base_model"), "quantization": info.get("quantization")}
