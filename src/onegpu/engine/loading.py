"""Loading a model for serving: a local folder or a hub id, plain or 8-bit GPTQ, with an adapter.

Every GPTQ and peft call made at serving time is in this module, except the layers built from a
checkpoint's packed tensors (`gptq_layers.py`: fused projections, a quantized lm_head).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from onegpu.device import cap_gpu_memory, cuda_index, resolve_device, resolve_dtype
from onegpu.engine.config import EngineConfig
from onegpu.engine.embedded import EMBEDDED_NAME, embedded_model_dir
from onegpu.engine.fusion import fuse
from onegpu.engine.generate import Engine
from onegpu.engine.gptq_layers import gptq_config, load_quantized_head
from onegpu.engine.kvcache import bytes_per_token
from onegpu.engine.types import ModelInfo
from onegpu.errors import UserError
from onegpu.gguf import converted, is_gguf

log = logging.getLogger(__name__)

# Of the GPU (or of its cap), the share weights + KV cache + activations may use: 22 of 24 GiB.
MEMORY_TARGET = 0.9
# Kept free for a prefill chunk's activations (logits, MLP, echo scoring) and the decode graphs.
ACTIVATION_RESERVE_GIB = 1.5
# On the CPU, memory is not the limit: the pool holds this many full contexts.
CPU_CONTEXTS = 4


class ModelLoadError(UserError):
    """The model, its quantization or its adapter cannot be loaded as configured."""


def read_quantization(model_dir: Path) -> dict | None:
    """The `quantization_config` of a local checkpoint's config.json, if any."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("quantization_config")


def check_quantization(quantization: dict) -> None:
    """Refuse quantization metadata this server cannot serve, naming what is wrong."""
    method = quantization.get("quant_method")
    if method != "gptq":
        raise ModelLoadError(
            f"incompatible quantization metadata in config.json: quant_method={method!r} "
            "(this server loads GPTQ checkpoints, e.g. from `onegpu quantize`)"
        )
    if quantization.get("bits") not in (4, 8):
        raise ModelLoadError(
            "incompatible quantization metadata in config.json: "
            f"GPTQ bits={quantization.get('bits')!r} (4 or 8 expected)"
        )


def _gptq_kwargs(quantization: dict, device: torch.device, *, deterministic: bool = False) -> dict:
    """from_pretrained arguments for a GPTQ checkpoint: Marlin on CUDA, the torch kernel on CPU.

    Deterministic serving keeps GPTQ's own packing (the torch kernel's layout), which the
    batch-invariant kernels read; Marlin repacks it for its own tiles.
    """
    backend = "marlin" if device.type == "cuda" and not deterministic else "torch"
    return {"quantization_config": gptq_config(quantization, backend)}


def load_engine(config: EngineConfig) -> Engine:
    """Load the configured model and tokenizer (and adapter) and wrap them in an Engine."""
    device = resolve_device(config.device)
    # fp16 is what the 8-bit GPTQ kernels are fastest with.
    dtype = resolve_dtype(config.dtype, device, cuda_default=torch.float16)
    cap_gpu_memory(device, config.gpu_memory_gib)
    model, tokenizer, info = _load_model(config, device, dtype)
    blocks = plan_blocks(model, device, dtype, config, max_context=info.max_context)
    engine = Engine(model, tokenizer, config, info=info, num_blocks=blocks)
    start = time.perf_counter()
    engine.warmup()
    log.warning("engine warmed up in %.1f s", time.perf_counter() - start)
    return engine


def _source(config: EngineConfig) -> tuple[str | Path, str]:
    """Where the model loads from (a folder or hub id) and the name it is served under."""
    if config.model is None:
        return embedded_model_dir(), EMBEDDED_NAME
    if is_gguf(config.model):
        return converted(config.model), config.model
    return config.model, config.model


def _load_model(config: EngineConfig, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, ModelInfo): loaded, with its adapter or fused, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = _source(config)
    quantization = read_quantization(Path(source)) if Path(source).is_dir() else None
    kwargs: dict = {"dtype": dtype, "device_map": {"": str(device)}}
    if config.revision:
        kwargs["revision"] = config.revision
    if config.trust_remote_code:
        log.warning("trust_remote_code is on: the model's own Python code will run")
        kwargs["trust_remote_code"] = True
    quant_label = None
    if quantization:
        check_quantization(quantization)
        kwargs.update(_gptq_kwargs(quantization, device, deterministic=config.deterministic))
        quant_label = f"gptq-{quantization['bits']}bit"
    log.warning("loading model %s on %s (%s)", name, device, str(dtype).removeprefix("torch."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if quantization:
            load_quantized_head(model, Path(source))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    if config.adapter:
        model = _load_adapter(model, config.adapter)
    elif config.fuse:
        # GPTQ layers are joined from the checkpoint's packed tensors (a local folder).
        fuse(model, checkpoint=Path(source) if quantization else None)
    if quantization and config.dense_prefill and device.type == "cuda":
        from onegpu.engine.dense_prefill import install  # Triton: imported on CUDA only

        install(model)  # before the KV cache takes what memory is left
    model.eval()
    max_context = config.max_context
    model_limit = getattr(model.config, "max_position_embeddings", None)
    if model_limit and model_limit < max_context:
        log.warning(
            "model supports %d positions: max_context lowered from %d", model_limit, max_context
        )
        max_context = model_limit
    info = ModelInfo(
        name=name,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        max_context=max_context,
        vocab_size=len(tokenizer),
        quantization=quant_label,
        adapter=config.adapter,
    )
    log.warning(
        "model ready: %s (quantization=%s, adapter=%s, context=%d)",
        name,
        quant_label or "none",
        config.adapter or "none",
        max_context,
    )
    return model, tokenizer, info


def plan_blocks(
    model, device: torch.device, dtype: torch.dtype, config: EngineConfig, *, max_context: int
) -> int:
    """How many KV blocks the pool gets: the GPU memory left beside the weights.

    On a 24 GiB card with Qwen-14B (40 KV heads: 800 KB per position in fp16, 410 KB in int8)
    that is about 6,100 positions in fp16 (12,000 in int8), shared by every running request and
    the prefix cache. The pool must hold at least one full context, so that a request can always
    finish alone; the scheduler admits by blocks, so the cache can never run the card out of
    memory.
    """
    block_size, kv_dtype = config.block_size, config.kv_cache_dtype
    full_context = -(-max_context // block_size) + 1  # + the null block
    if device.type != "cuda":
        return CPU_CONTEXTS * full_context
    per_token = bytes_per_token(model.config, dtype, kv_dtype)
    if per_token is None:
        log.warning("cannot read the KV size from the model config: one context's worth of cache")
        return full_context
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    gib = config.gpu_memory_gib
    cap = min(total, gib * 2**30) if gib else total
    budget = (
        cap * MEMORY_TARGET - torch.cuda.memory_allocated(index) - ACTIVATION_RESERVE_GIB * 2**30
    )
    per_block = per_token * block_size
    blocks = int(max(budget, 0) // per_block)
    if blocks < full_context:
        raise ModelLoadError(
            f"the KV cache of one {max_context}-token context needs "
            f"{full_context * per_block / 2**30:.2f} GiB, but only {max(budget, 0) / 2**30:.2f} "
            "GiB are left beside the weights; lower --max-context, use --kv-cache-dtype int8 or "
            "raise --gpu-memory-gib"
        )
    log.warning(
        "KV cache: %d blocks of %d positions = %d positions (%.2f GiB; %.0f KB per position, %s)",
        blocks,
        block_size,
        blocks * block_size,
        blocks * per_block / 2**30,
        per_token / 1024,
        kv_dtype,
    )
    return blocks


def _load_adapter(model, adapter: str):
    from peft import PeftModel

    log.warning("loading adapter %s", adapter)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load adapter {adapter!r}: {exc}") from exc
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise ModelLoadError(
            f"cannot load adapter {adapter!r}: its weights do not fit this model; it was trained "
            f"on {adapter_base(adapter)!r}: serve it on that base, or train one for this model"
        ) from exc


def adapter_base(adapter: str | Path) -> str | None:
    """The base model a peft adapter names in its adapter_config.json (None when unreadable)."""
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("base_model_name_or_path")
