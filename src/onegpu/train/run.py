"""`train(...) -> Path`: data to a served adapter, with a run record beside it."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from onegpu.provenance import library_versions, peak_rss_bytes
from onegpu.train import model as tm
from onegpu.train.batching import make_batches
from onegpu.train.format import TEMPLATES, special_prefix, tokenize
from onegpu.train.loop import CHECKPOINTS, LoopConfig, latest_checkpoint, run
from onegpu.train.sources import SourceSpec, load_source, mix

log = logging.getLogger(__name__)

RECORD_FILE = "onegpu.json"
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


def train(
    model: str | Path,
    data: Sequence[str | SourceSpec],
    output: str | Path,
    *,
    revision: str | None = None,
    quantization: str = "auto",
    template: str = "qa",
    max_length: int = 2048,
    packing: bool = False,
    eval_fraction: float = 0.02,
    max_eval_examples: int | None = 200,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 1,
    grad_accum: int = 16,
    lr: float = 2e-4,
    min_lr_ratio: float = 0.0,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    optimizer: str = "auto",
    lora_r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = tm.DEFAULT_TARGETS,
    neftune_alpha: float | None = None,
    gradient_checkpointing: bool = True,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    gpu_memory_gib: float | None = None,
    eval_every: int | None = None,
    save_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    merge_base: str | Path | None = None,
    merge_output: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Train a LoRA adapter on `model` and write it to `output` (a peft adapter folder).

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
    torch's AdamW. Checkpoints every `save_every` steps let `resume=True` continue an interrupted
    run. `gpu_memory_gib` caps GPU memory (24 behaves like an RTX 4090).

    With `merge_base` (the 16-bit model the base was quantized from), the adapter is also folded
    into it and saved at `merge_output`; quantize that with `onegpu quantize` to serve one model.

    Returns `output`, holding adapter_config.json, adapter_model.safetensors and onegpu.json (the
    run record: config, data counts, seed, versions, losses).
    """
    started = time.perf_counter()
    output = Path(output)
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    if max_length < 2 or batch_size < 1 or grad_accum < 1:
        raise ValueError("max_length must be >= 2, batch_size and grad_accum >= 1")
    if not data:
        raise ValueError("no data sources given")
    _prepare_output(output, resume=resume, overwrite=overwrite)
    specs = [s if isinstance(s, SourceSpec) else SourceSpec.parse(str(s)) for s in data]
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    base = tm.load_base(
        model,
        quantization=quantization,
        device=device,
        dtype=dtype,
        revision=revision,
        attn_implementation=attn_implementation,
        gradient_checkpointing=gradient_checkpointing,
        gpu_memory_gib=gpu_memory_gib,
        trust_remote_code=trust_remote_code,
    )
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    loaded = []
    described = {}
    for spec in specs:
        conversations, where = load_source(spec)
        loaded.append((spec, conversations))
        described[spec.name] = where
    train_convs, eval_convs, counts = mix(
        loaded, eval_fraction=eval_fraction, max_eval=max_eval_examples, seed=seed
    )
    tokenizer = base.tokenizer
    prefix = special_prefix(tokenizer)
    fmt = TEMPLATES[template]

    def tokenized(convs, desc):
        out, dropped = [], Counter()
        for conv in tqdm(convs, desc=desc, unit="ex", disable=not progress or len(convs) < 1000):
            ex = tokenize(conv, tokenizer, fmt, max_length=max_length, prefix=prefix)
            if ex is None:
                dropped[conv.source] += 1
            else:
                out.append(ex)
        return out, dropped

    train_examples, train_dropped = tokenized(train_convs, "tokenizing train")
    eval_examples, _ = tokenized(eval_convs, "tokenizing eval")
    if not train_examples:
        raise ValueError("no training example has a reply token within max_length")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    pad_id = 0 if pad_id is None else pad_id
    batching = {"batch_size": batch_size, "max_length": max_length, "packing": packing}

    @lru_cache(maxsize=1)
    def epoch_batches(epoch: int):
        return make_batches(train_examples, pad_id=pad_id, seed=seed + epoch, **batching)

    eval_batches = make_batches(eval_examples, pad_id=pad_id, seed=None, **batching)
    per_epoch = len(epoch_batches(0))
    steps = max_steps or max(1, math.ceil(epochs * per_epoch / grad_accum))
    timings["data"] = time.perf_counter() - t0
    log.warning(
        "data: %d train examples (%d micro-batches per epoch), %d eval; %d optimizer steps",
        len(train_examples),
        per_epoch,
        len(eval_examples),
        steps,
    )

    lora = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout}
    torch.manual_seed(seed)  # LoRA's A matrices start random
    peft_model = tm.add_lora(base.model, target_modules=tuple(target_modules), **lora)
    n_trainable = sum(p.numel() for p in tm.trainable_parameters(peft_model))
    cfg = LoopConfig(
        steps=steps,
        grad_accum=grad_accum,
        lr=lr,
        min_lr_ratio=min_lr_ratio,
        warmup_steps=round(warmup_ratio * steps),
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        optimizer=optimizer,
        neftune_alpha=neftune_alpha,
        eval_every=eval_every,
        save_every=save_every,
        keep_checkpoints=keep_checkpoints,
        seed=seed,
    )
    t0 = time.perf_counter()
    history = run(
        peft_model,
        epoch_batches,
        eval_batches,
        cfg,
        device=base.device,
        output=output,
        resume=resume,
        progress=progress,
    )
    timings["train"] = time.perf_counter() - t0
    tm.save_adapter(peft_model, output)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)

    for c in counts:
        c.detail = {**described.get(c.name, {}), "dropped_too_long": train_dropped[c.name]}
    record: dict[str, Any] = {
        "format": "lora",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {
            "path": str(model),
            "revision": revision,
            **base.describe(),
            "quantized_from": _quantized_from(model),
        },
        "adapter": {
            **lora,
            "target_modules": list(target_modules),
            "trainable_parameters": n_trainable,
        },
        "data": {
            "sources": [asdict(c) for c in counts],
            "template": template,
            "max_length": max_length,
            "packing": packing,
            "neftune_alpha": neftune_alpha,
            "train_examples": len(train_examples),
            "eval_examples": len(eval_examples),
            "eval_fraction": eval_fraction,
            "micro_batches_per_epoch": per_epoch,
            "train_tokens_per_epoch": sum(len(e) for e in train_examples),
            "train_targets_per_epoch": sum(e.n_targets for e in train_examples),
        },
        "training": {
            **asdict(cfg),
            "epochs": epochs if max_steps is None else None,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "warmup_ratio": warmup_ratio,
            "gradient_checkpointing": gradient_checkpointing,
            "attn_implementation": attn_implementation,
            "optimizer_used": history.optimizer,
            "resumed_from_step": history.resumed_from,
            "gpu_memory_gib": gpu_memory_gib,
        },
        "libraries": library_versions(LIBRARIES),
        "timings_s": {k: round(v, 3) for k, v in timings.items()}
        | {"total": round(time.perf_counter() - started, 3)},
        "memory": {
            "peak_gpu_bytes": history.peak_gpu_bytes,
            "peak_host_rss_bytes": peak_rss_bytes(),
        },
        "losses": {"train": history.train, "eval": history.eval},
        "merged": None,
    }
    _write_record(output, record)
    first, last = history.eval[:1], history.eval[-1:]
    if first and last:
        log.warning("eval loss %.4f -> %.4f", first[0]["loss"], last[0]["loss"])
    log.warning("adapter written to %s", output)

    if merge_base is not None:
        del peft_model, base
        merged_to = (
            Path(merge_output) if merge_output else output.with_name(output.name + "-merged")
        )
        tm.merge_adapter(output, merge_base, merged_to, revision=None)
        record["merged"] = {"base": str(merge_base), "output": str(merged_to)}
        _write_record(output, record)
        log.warning("merged model written to %s: run `onegpu quantize` on it to serve", merged_to)
    return output


def merge(adapter: str | Path, base: str | Path, output: str | Path, **kwargs: Any) -> Path:
    """Fold a trained adapter into its 16-bit base model and save the result at `output`."""
    return tm.merge_adapter(Path(adapter), base, Path(output), **kwargs)


def _prepare_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder")
    if overwrite:
        shutil.rmtree(output, ignore_errors=True)
    elif (output / RECORD_FILE).exists():
        raise FileExistsError(
            f"{output} already holds a trained adapter (pass overwrite=True to train again)"
        )
    elif latest_checkpoint(output) is not None and not resume:
        raise FileExistsError(
            f"{output} holds checkpoints of an unfinished run: pass resume=True to continue it "
            "or overwrite=True to start again"
        )
    elif output.exists() and not resume and any(p.name != CHECKPOINTS for p in output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty (pass overwrite=True)")
    output.mkdir(parents=True, exist_ok=True)


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


def _write_record(output: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2) + "\n"
    (output / RECORD_FILE).write_text(text, encoding="utf-8")
