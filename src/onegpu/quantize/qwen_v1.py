"""Qwen v1 (`QWenLMHeadModel`, e.g. Qwen/Qwen-14B) converted to transformers' native Qwen2 layout.

Qwen v1 ships as remote code that no longer runs on transformers 5. Its weights are a Qwen2 model
under other names: `c_attn` holds q, k and v (with biases) stacked, `w2` is the gate and `w1` the up
projection (v1 computes `c_proj(w1(x) * silu(w2(x)))`), RMSNorm and rotary embeddings are the same.
The conversion is done once, tensor by tensor, and nothing runs `trust_remote_code` afterwards.

Exact within v1's `seq_length` window (2,048 tokens for Qwen-14B): v1's `use_dynamic_ntk` (rotary
base stretched with the length) and `use_logn_attn` (queries scaled by log(position)) change nothing
until a sequence is longer than `seq_length`, and Qwen2 has neither. The output's
`max_position_embeddings` is that window, and `onegpu_conversion.json` records it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig, Qwen2Config

import onegpu
from onegpu.errors import ModelNotFoundError, UserError
from onegpu.files import staged
from onegpu.quantize.qwen_tokenizer import (
    ENDOFTEXT,
    IMEND,
    IMSTART,
    TIKTOKEN_FILE,
    convert_qwen_tokenizer,
    load_tiktoken_ranks,
    special_tokens,
)

logger = logging.getLogger(__name__)

V1_ARCHITECTURE = "QWenLMHeadModel"
METADATA_FILE = "onegpu_conversion.json"
# Only what the conversion reads: weights, configs and the vocabulary (never the remote code).
HUB_PATTERNS = ["*.safetensors", "*.json", TIKTOKEN_FILE]
_REQUIRED_V1_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
    "seq_length",
    "layer_norm_epsilon",
    "rotary_emb_base",
)
# safetensors header dtype -> torch dtype name; anything else is a quantized or foreign checkpoint.
_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# Non-persistent buffers that some v1 checkpoints saved anyway: recomputed by Qwen2, so dropped.
_V1_BUFFERS = re.compile(
    r"transformer\.(?:h\.\d+\.attn\.(?:masked_bias|bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)"
)
_V1_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_TOP_LEVEL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",  # inside silu()
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


class QwenV1ConversionError(UserError, ValueError):
    """The source is not a Qwen v1 checkpoint this converter can translate exactly."""


def qwen2_config_from_v1(v1_config: Mapping, *, eos_token_id: int = 151643) -> Qwen2Config:
    """The Qwen2 configuration equivalent to a Qwen v1 `config.json` (as a dict).

    `max_position_embeddings` is v1's `seq_length`: the window within which the two agree exactly.
    `eos_token_id` is v1's `<|endoftext|>` (151643 with the real vocabulary).
    """
    architectures = v1_config.get("architectures") or []
    if v1_config.get("model_type") != "qwen" and V1_ARCHITECTURE not in architectures:
        raise QwenV1ConversionError(
            f"not a Qwen v1 checkpoint: model_type={v1_config.get('model_type')!r}, "
            f"architectures={architectures!r} (expected 'qwen' / {V1_ARCHITECTURE!r})"
        )
    missing = [key for key in _REQUIRED_V1_KEYS if key not in v1_config]
    if missing:
        raise QwenV1ConversionError(f"Qwen v1 config.json lacks {missing}")
    hidden, heads = v1_config["hidden_size"], v1_config["num_attention_heads"]
    # Each line: (holds, why the conversion would not be exact otherwise).
    checks = [
        (hidden % heads == 0, f"hidden_size {hidden} is not a multiple of {heads} heads"),
        (
            v1_config.get("kv_channels", hidden // heads) * heads == hidden,
            f"kv_channels × heads ({v1_config.get('kv_channels')} × {heads}) != hidden_size",
        ),
        (v1_config.get("rotary_pct", 1.0) == 1.0, "partial rotary (rotary_pct != 1)"),
        (v1_config.get("no_bias", True), "no_bias=false (biases on c_proj/w1/w2)"),
        (v1_config.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (not v1_config.get("tie_word_embeddings", False), "tied embeddings"),
        (v1_config["intermediate_size"] % 2 == 0, "odd intermediate_size"),
    ]
    unsupported = [why for holds, why in checks if not holds]
    if unsupported:
        raise QwenV1ConversionError(f"unsupported Qwen v1 variant: {'; '.join(unsupported)}")
    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=v1_config["vocab_size"],
        hidden_size=hidden,
        # v1's intermediate_size counts w1 and w2 together; each is half of it.
        intermediate_size=v1_config["intermediate_size"] // 2,
        num_hidden_layers=v1_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="silu",
        max_position_embeddings=v1_config["seq_length"],
        initializer_range=v1_config.get("initializer_range", 0.02),
        rms_norm_eps=v1_config["layer_norm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(v1_config["rotary_emb_base"])},
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def v1_tensor_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen v1 checkpoint with this (converted) configuration must hold, by shape."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    shapes = {
        "transformer.wte.weight": (config.vocab_size, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_hidden_layers):
        layer = f"transformer.h.{i}"
        shapes |= {
            f"{layer}.ln_1.weight": (hidden,),
            f"{layer}.attn.c_attn.weight": (3 * hidden, hidden),
            f"{layer}.attn.c_attn.bias": (3 * hidden,),
            f"{layer}.attn.c_proj.weight": (hidden, hidden),
            f"{layer}.ln_2.weight": (hidden,),
            f"{layer}.mlp.w1.weight": (ffn, hidden),
            f"{layer}.mlp.w2.weight": (ffn, hidden),
            f"{layer}.mlp.c_proj.weight": (hidden, ffn),
        }
    return shapes


def convert_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One v1 tensor under its Qwen2 name(s): `c_attn` splits into q/k/v, the rest is renamed.

    Returns nothing for buffers that v1 checkpoints sometimes saved (masks, rotary frequencies).
    """
    if _V1_BUFFERS.fullmatch(name):
        return {}
    if name in _TOP_LEVEL:
        return {_TOP_LEVEL[name]: tensor}
    match = _V1_LAYER.fullmatch(name)
    if match is None:
        raise QwenV1ConversionError(f"unexpected tensor in a Qwen v1 checkpoint: {name!r}")
    layer, rest = f"model.layers.{match[1]}", match[2]
    if rest in _PER_LAYER:
        return {f"{layer}.{_PER_LAYER[rest]}": tensor}
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        # v1 splits c_attn's output as [q | k | v] along features: rows of the [3H, H] weight.
        q, k, v = tensor.chunk(3, dim=0)  # each [H, H] (weight) or [H] (bias)
        return {
            f"{layer}.self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)
        }
    raise QwenV1ConversionError(f"unexpected tensor in a Qwen v1 checkpoint: {name!r}")


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A v1 state dict (or one shard of it) under Qwen2 names, as owned copies in `dtype`
    (`None` keeps each tensor's dtype)."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for new_name, new in convert_tensor(name, tensor).items():
            # A copy: the q/k/v chunks share storage, which safetensors refuses to save.
            converted[new_name] = new.to(dtype=dtype or new.dtype, copy=True)
    return converted


@dataclass(frozen=True)
class _Source:
    folder: Path
    revision: str | None
    shards: list[Path]


def _weight_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("pytorch_model*.bin")):
        raise QwenV1ConversionError(
            f"{folder} has only PyTorch .bin weights; this converter reads safetensors"
        )
    raise QwenV1ConversionError(f"no safetensors weights in {folder}")


def _resolve_source(src: str | Path, revision: str | None) -> _Source:
    path = Path(src).expanduser()
    if path.is_dir():
        return _Source(path, revision, _weight_shards(path))
    if path.exists() or str(src).startswith((".", "/", "~")):
        raise QwenV1ConversionError(f"{src} is not a checkpoint folder")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s (revision %s) from the Hugging Face Hub", src, revision or "main")
    folder = Path(snapshot_download(str(src), revision=revision, allow_patterns=HUB_PATTERNS))
    # The hub cache keeps each download under snapshots/<commit hash>: record the exact commit.
    return _Source(folder, folder.name, _weight_shards(folder))


def _read_headers(shards: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (shard, shape, dtype) from the safetensors headers, without reading any weights."""
    headers = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            names = f.keys()  # safe_open handles are not iterable
            for name in names:
                tensor_slice = f.get_slice(name)
                headers[name] = (shard, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return headers


def _check_tensors(headers: Mapping[str, tuple], expected: Mapping[str, tuple[int, ...]]) -> None:
    present = {name for name in headers if not _V1_BUFFERS.fullmatch(name)}
    problems = []
    if unexpected := sorted(present - expected.keys()):
        problems.append(f"unexpected tensors {unexpected[:5]} ({len(unexpected)} in all)")
    if missing := sorted(expected.keys() - present):
        problems.append(f"missing tensors {missing[:5]} ({len(missing)} in all)")
    wrong = [
        f"{name} {headers[name][1]} (config says {shape})"
        for name, shape in expected.items()
        if name in headers and headers[name][1] != shape
    ]
    if wrong:
        problems.append(f"shapes that disagree with config.json: {wrong[:5]}")
    if problems:
        raise QwenV1ConversionError(
            f"not a Qwen v1 checkpoint of this config: {'; '.join(problems)}"
        )


class _ShardWriter:
    """Writes tensors into safetensors shards of about `max_bytes`, then names them and the index
    the way transformers expects (`model-00001-of-00003.safetensors`)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = tensor
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        part = self.folder / f"part-{len(self.shards):05d}.safetensors"
        save_file(self.pending, part, metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        count, weight_map = len(self.shards), {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"part-{i:05d}.safetensors").rename(self.folder / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _converted_tensors(
    headers: Mapping[str, tuple[Path, tuple[int, ...], str]], dtype: torch.dtype | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Converted tensors, one source tensor at a time, reading each source shard once."""
    by_shard: dict[Path, list[str]] = {}
    for name, (shard, _, _) in headers.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        with safe_open(shard, framework="pt") as f:
            for name in names:
                yield convert_state_dict({name: f.get_tensor(name)}, dtype=dtype)


def generation_config_from_v1(
    v1_generation: Mapping | None, *, endoftext_id: int = 151643
) -> GenerationConfig:
    """v1's `generation_config.json` in standard fields: sampling settings are kept, v1-only keys
    (`chat_format`, `max_window_size`, `stop_words_ids`) become eos ids, and no pad token is set."""
    v1_generation = v1_generation or {}
    eos = [endoftext_id]
    if v1_generation.get("chat_format") == "chatml":
        # v1's chat() stops on <|im_end|> and <|im_start|>; their ids follow <|endoftext|>.
        eos += [endoftext_id + 2, endoftext_id + 1]
    for stop in v1_generation.get("stop_words_ids") or []:
        if len(stop) == 1:
            eos.append(stop[0])
        else:
            logger.warning("dropping multi-token stop sequence %s: not expressible as eos", stop)
    eos = list(dict.fromkeys(eos))
    kept = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
    settings = {key: v1_generation[key] for key in kept if key in v1_generation}
    return GenerationConfig(eos_token_id=eos[0] if len(eos) == 1 else eos, **settings)


def convert_qwen_v1(
    src: str | Path,
    dst: Path,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    max_shard_size: int = 2 * 1024**3,
) -> Path:
    """Convert a Qwen v1 checkpoint (hub id such as `Qwen/Qwen-14B`, or local folder) into a native
    Qwen2 folder at `dst`: weights, config, generation config and fast tokenizer.

    Exact within v1's `seq_length` window (2,048 tokens for Qwen-14B); v1's dynamic NTK and logn
    attention only act beyond it and are not carried over. Streams tensor by tensor: host memory
    stays near `max_shard_size` plus the largest tensor. `dtype` None keeps the stored dtype.
    Writes into `<dst>.partial` and renames it at the end, so `dst` is never half written: after
    an interruption, run the same command again.
    """
    started = time.perf_counter()
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    source = _resolve_source(src, revision)
    v1_config = json.loads((source.folder / "config.json").read_text())
    tiktoken_file = source.folder / TIKTOKEN_FILE
    if not tiktoken_file.is_file():
        raise QwenV1ConversionError(f"{source.folder} has no {TIKTOKEN_FILE} (v1's vocabulary)")
    specials = special_tokens(len(load_tiktoken_ranks(tiktoken_file)))
    config = qwen2_config_from_v1(v1_config, eos_token_id=specials[ENDOFTEXT])
    if config.vocab_size < max(specials.values()) + 1:
        raise QwenV1ConversionError(
            f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(specials)} ids"
        )
    headers = _read_headers(source.shards)
    _check_tensors(headers, v1_tensor_shapes(config))
    stored_dtype = _FLOAT_DTYPES.get(headers["lm_head.weight"][2])
    if stored_dtype is None:
        raise QwenV1ConversionError(f"lm_head is {headers['lm_head.weight'][2]}, not float weights")
    config.dtype = str(dtype).removeprefix("torch.") if dtype is not None else stored_dtype

    with staged(dst) as partial:
        _write_converted(
            source,
            headers,
            config,
            v1_config,
            specials,
            partial,
            dtype=dtype,
            max_shard_size=max_shard_size,
            src=src,
            started=started,
        )
    logger.info("converted %s to %s in %.0f s", src, dst, time.perf_counter() - started)
    return dst


def _write_converted(
    source,
    headers,
    config,
    v1_config,
    specials,
    partial: Path,
    *,
    dtype,
    max_shard_size: int,
    src: str,
    started: float,
) -> None:
    """The converted folder's files: weights shard by shard, configs, tokenizer, metadata."""
    writer = _ShardWriter(partial, max_shard_size)
    with tqdm(total=len(headers), desc="Converting Qwen v1", unit="tensor") as progress:
        for tensors in _converted_tensors(headers, dtype):
            writer.add(tensors)
            progress.update()
    writer.finish()
    config.save_pretrained(partial)
    generation_file = source.folder / "generation_config.json"
    v1_generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    generation_config_from_v1(v1_generation, endoftext_id=specials[ENDOFTEXT]).save_pretrained(
        partial
    )
    tiktoken_file = source.folder / TIKTOKEN_FILE
    convert_qwen_tokenizer(tiktoken_file, partial, model_max_length=config.max_position_embeddings)
    metadata = {
        "converter": "onegpu.quantize.qwen_v1",
        "source": {"model": str(src), "revision": source.revision, "architecture": V1_ARCHITECTURE},
        "architecture": "Qwen2ForCausalLM",
        "dtype": config.dtype,
        "exact_within_tokens": config.max_position_embeddings,
        "not_carried_over": {
            "use_dynamic_ntk": v1_config.get("use_dynamic_ntk", True),
            "use_logn_attn": v1_config.get("use_logn_attn", True),
            "why": "both act only beyond seq_length tokens; the converted model is exact within it",
        },
        "special_tokens": {name: specials[name] for name in (ENDOFTEXT, IMSTART, IMEND)},
        "versions": {
            "onegpu": onegpu.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def read_config(model: str, revision: str | None) -> dict:
    """The model's config.json, from a local folder or the hub (only that file is downloaded)."""
    local = Path(model)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{model} has no config.json: pass a model folder")
        return json.loads((local / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(
            Path(hf_hub_download(model, "config.json", revision=revision)).read_text()
        )
    except (OSError, ValueError) as exc:  # not a repository id, not on the hub, offline
        raise ModelNotFoundError(
            f"cannot find model {model!r}: it is not a local folder, and the Hugging Face Hub "
            f"gives no config.json for it ({type(exc).__name__}); pass a model folder or a hub id"
        ) from exc


def is_qwen_v1(config: dict) -> bool:
    return config.get("model_type") == "qwen" or V1_ARCHITECTURE in (
        config.get("architectures") or []
    )


def native_checkpoint(
    model: str, revision: str | None, converted: Path
) -> tuple[str | Path, str | None]:
    """`model` and `revision` when the model has a native transformers layout; for Qwen v1, its
    Qwen2 conversion in `converted` (made once, then reused) and no revision."""
    if not is_qwen_v1(read_config(model, revision)):
        return model, revision
    if (converted / "config.json").is_file():
        logger.warning("reusing the converted Qwen2 copy in %s", converted)
    else:
        logger.warning("Qwen v1 checkpoint: converting to the native Qwen2 layout in %s", converted)
        convert_qwen_v1(model, converted, revision=revision)
    return converted, None
