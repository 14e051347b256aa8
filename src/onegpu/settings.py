"""Typed settings, one class per job, read from flags and `ONEGPU_*` environment variables.

Each field is written here once, with its default and a description. `onegpu.cli` makes a flag of
every field (`max_batch` -> `--max-batch`) and pydantic-settings reads its environment variable.
Each job has its own prefix, so a variable set for the server never changes a quantize or train
run: `ONEGPU_MAX_BATCH` (serve), `ONEGPU_QUANTIZE_BITS`, `ONEGPU_TRAIN_LR`. Flags win over the
environment, which wins over the defaults; `onegpu config JOB` prints what a job would use.

This module never imports torch: the server reads `ServeSettings`.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onegpu.engine.config import (
    DENSE_MIN_ROWS,
    SPECULATIVE_TOKENS_CUDA,
    Dtype,
    EngineConfig,
    KvCacheDtype,
)

# The engine's own defaults; ServeSettings describes these fields for people and reuses them.
ENGINE = EngineConfig()

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
GPTQ_BITS = (4, 8)
# Powers of two that vLLM's and Marlin's GPTQ kernels take; -1 is one scale per output channel.
GPTQ_GROUP_SIZES = (-1, 32, 64, 128, 256, 512, 1024)


class JobSettings(BaseSettings):
    """What every job reads: its log level. `none` in an environment variable means unset."""

    model_config = SettingsConfigDict(extra="ignore", env_parse_none_str="none")
    # Fields given as plain arguments rather than flags, in order (`onegpu quantize MODEL`).
    cli_positional: ClassVar[tuple[str, ...]] = ()

    log_level: str = Field("INFO", description="DEBUG (with tracebacks), INFO, WARNING or ERROR")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable that sets `field`, e.g. ONEGPU_MAX_BATCH."""
        return (cls.model_config["env_prefix"] + field).upper()

    def configure_logging(self) -> None:
        """Log to stderr at this job's level: once per process, from `onegpu.cli.main`."""
        logging.basicConfig(
            level=self.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


class ServeSettings(JobSettings):
    """`onegpu serve`: what model to load and how to serve it (env: ONEGPU_MODEL, ...)."""

    model_config = SettingsConfigDict(env_prefix="ONEGPU_")

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on (the container uses 80)")
    model: str | None = Field(
        ENGINE.model,
        description="local folder, hub id or Llama/Qwen2 .gguf file; none serves the embedded "
        "SmolLM2-135M",
    )
    revision: str | None = Field(ENGINE.revision, description="hub revision (branch, tag, commit)")
    adapter: str | None = Field(
        ENGINE.adapter, description="peft adapter folder served on top of the model"
    )
    device: str = Field(ENGINE.device, description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Dtype = Field(ENGINE.dtype, description="auto is float16 on CUDA, float32 on the CPU")
    gpu_memory_gib: float | None = Field(
        ENGINE.gpu_memory_gib, gt=0, description="cap on GPU memory, e.g. 24 to act as an RTX 4090"
    )
    max_context: int = Field(
        ENGINE.max_context, ge=16, description="context window in tokens: prompt + new tokens"
    )
    default_stop: tuple[str, ...] = Field(
        ENGINE.default_stop,
        description="where an answer ends when a request asks for more than one token and gives "
        "no stop_sequences (repeat the flag for several)",
    )
    trust_remote_code: bool = Field(
        ENGINE.trust_remote_code,
        description="run the model repository's own code (never needed for Qwen-14B here)",
    )
    max_batch: int = Field(
        ENGINE.max_batch,
        ge=1,
        description="most requests decoded together (fewer if memory is short)",
    )
    cuda_graphs: bool = Field(
        ENGINE.cuda_graphs, description="replay the decode step from CUDA graphs (off: eager)"
    )
    fuse: bool = Field(
        ENGINE.fuse,
        description="one GEMM for q/k/v and one for gate/up (Llama and Qwen2 layouts, "
        "not with --adapter); on CUDA, one Triton kernel each for norms, rotary and SiLU",
    )
    kv_cache_dtype: KvCacheDtype = Field(
        ENGINE.kv_cache_dtype,
        description="auto keeps keys and values in the model's dtype; int8 stores about twice "
        "as many positions (one scale per position and head)",
    )
    block_size: int = Field(
        ENGINE.block_size,
        ge=16,
        multiple_of=16,
        description="positions per KV cache block: the unit of memory and of prefix sharing",
    )
    prefill_chunk: int = Field(
        ENGINE.prefill_chunk,
        ge=16,
        description="prompt tokens prefilled per step, packed across requests; a longer prompt "
        "is split over steps so running requests keep decoding",
    )
    prefix_cache: bool = Field(
        ENGINE.prefix_cache,
        description="share the KV blocks of identical prompt prefixes between requests",
    )
    dense_prefill: bool = Field(
        ENGINE.dense_prefill,
        description=f"8-bit GPTQ on CUDA: a prefill pass of {DENSE_MIN_ROWS} or more prompt tokens "
        "dequantizes each layer's weight to fp16 and multiplies with cuBLAS instead of Marlin "
        "(costs one buffer the size of the largest layer's fp16 weight)",
    )
    deterministic: bool = Field(
        ENGINE.deterministic,
        description="batch-invariant kernels: a greedy answer is bit-identical alone or among "
        "others, cached or not (costs speed; see the README)",
    )
    speculative_tokens: int | None = Field(
        ENGINE.speculative_tokens,
        ge=0,
        le=16,
        description="greedy requests draft up to this many tokens from their own text and "
        "verify them in one pass (prompt lookup; each token is still the one the request would "
        "take without it, and the answer bit-identical under --deterministic); on the GPU the "
        "draft is cut so that a pass holds at most 64 rows; 0 turns it off; unset: "
        f"{SPECULATIVE_TOKENS_CUDA} on a CUDA GPU, 0 on the CPU (where it is slower)",
    )
    speculate_sampled: bool = Field(
        ENGINE.speculate_sampled,
        description="sampled requests draft too (each token is still the one the request "
        "draws without drafts); off until measured a win on a GPU (see the README)",
    )
    speculate_always: bool = Field(
        ENGINE.speculate_always,
        description="verify every draft, even when what a request's drafts kept so far says "
        "the wider pass will not pay for itself (for measuring what drafts keep)",
    )
    overlap: bool | None = Field(
        ENGINE.overlap,
        description="launch each plain decode step from the tokens the step before chose on "
        "the device, and record that step while the new one runs (same tokens, the host's turn "
        "hidden); unset: on a CUDA GPU, off on the CPU (where nothing runs beside the host)",
    )
    max_queue: int = Field(256, ge=1, description="requests allowed to wait; more get 503")
    request_timeout_s: float = Field(
        1800, gt=0, description="a request still unanswered after this gets 503 and is dropped"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger bodies get 413")
    shutdown_grace_s: float = Field(
        60, ge=0, description="on SIGTERM, how long in-flight requests get to finish"
    )

    @field_validator("model", "revision", "adapter")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        # ONEGPU_MODEL= (empty) serves the embedded model, as an unset variable does.
        return value or None

    def engine_config(self) -> EngineConfig:
        """The engine's part of these settings: each EngineConfig field from the same-named one."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})


class QuantizeSettings(JobSettings):
    """`onegpu quantize`: GPTQ quantization of a causal LM, with perplexity before and after."""

    model_config = SettingsConfigDict(env_prefix="ONEGPU_QUANTIZE_")
    cli_positional: ClassVar[tuple[str, ...]] = ("model",)

    model: str = Field(
        "Qwen/Qwen-14B",
        description="hub id, local folder or Llama/Qwen2 .gguf file; Qwen v1 is first converted "
        "to the Qwen2 layout",
    )
    output: Path = Field(description="folder to write the checkpoint to")
    revision: str | None = Field(None, description="hub revision (branch, tag, commit)")
    bits: int = Field(8, description="bits per weight: 4 or 8")
    group_size: int = Field(
        128, description="input channels per scale: -1 (per row) or 32 to 1024, dividing the widths"
    )
    sym: bool = Field(True, description="symmetric quantization (no zero points)")
    desc_act: bool = Field(False, description="act-order: quantize columns by activation size")
    damp_percent: float = Field(0.01, gt=0, lt=1, description="Hessian damping (GPTQ's 0.01)")
    lm_head: bool = Field(
        False,
        description="also quantize the output head (Qwen-14B's: 1.56 of the 14.4 GB read per "
        "token; untied heads only); off by default, the README has its measured cost",
    )
    calibration: str = Field("wikitext2", description="wikitext2 or a local .txt/.jsonl file")
    calibration_split: str = Field("train", description="WikiText-2 split to calibrate on")
    samples: int = Field(120, ge=1, description="calibration windows")
    seq_len: int = Field(2048, ge=1, description="tokens per calibration window")
    seed: int = Field(0, description="seed that draws the calibration windows")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Dtype = Field("auto", description="auto is bfloat16 on CUDA, float32 on the CPU")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory the evaluation models may take (the rest spills to RAM)"
    )
    eval_data: str | None = Field(
        "wikitext2", description="perplexity data: wikitext2 (test split), a file, or none to skip"
    )
    eval_max_length: int = Field(2048, ge=2, description="tokens per perplexity window")
    eval_stride: int = Field(2048, ge=1, description="tokens between perplexity windows")
    eval_max_tokens: int | None = Field(
        None, ge=2, description="measure perplexity on at most this many tokens"
    )
    eval_backend: str = Field("torch", description="GPTQModel kernel the quantized model runs on")
    ppl_threshold: float | None = Field(
        None, description="fail when perplexity rises by more than this fraction (0.01 = 1%)"
    )
    converted: Path | None = Field(
        None, description="where a Qwen v1 model is converted to (none: OUTPUT.qwen2)"
    )
    overwrite: bool = Field(False, description="replace an existing output folder")

    @field_validator("bits", "group_size")
    @classmethod
    def _supported(cls, value: int, info: ValidationInfo) -> int:
        choices = {"bits": GPTQ_BITS, "group_size": GPTQ_GROUP_SIZES}[info.field_name]
        if value not in choices:
            raise ValueError(f"{info.field_name} must be one of {', '.join(map(str, choices))}")
        return value

    @model_validator(mode="after")
    def _threshold_needs_eval_data(self) -> QuantizeSettings:
        if self.ppl_threshold is not None and self.eval_data is None:
            raise ValueError("ppl_threshold (--ppl-threshold) needs eval_data (--eval-data)")
        return self


class TrainSettings(JobSettings):
    """`onegpu train`: a LoRA adapter for `onegpu serve --adapter` (8-bit GPTQ base or QLoRA)."""

    model_config = SettingsConfigDict(env_prefix="ONEGPU_TRAIN_")

    model: str | None = Field(
        None, description="base: a GPTQ folder from `onegpu quantize`, or a 16-bit model"
    )
    data: list[str] = Field(
        default_factory=list, description="a data source SOURCE[:WEIGHT]; repeat to mix several"
    )
    output: Path = Field(description="adapter folder to write")
    revision: str | None = Field(None, description="hub revision of the base")
    quantization: Literal["auto", "gptq", "nf4", "none"] = Field(
        "auto", description="auto: GPTQ if the checkpoint is, else as it is; nf4: QLoRA (CUDA)"
    )
    template: Literal["qa", "alpaca", "chatml", "plain"] = Field(
        "qa", description="how a conversation is written out for the model"
    )
    max_length: int = Field(2048, ge=2, description="tokens per example and per row")
    packing: bool = Field(False, description="pack examples into rows (never attending each other)")
    eval_fraction: float = Field(0.02, description="share of each source held out for eval loss")
    max_eval_examples: int | None = Field(200, description="cap on held-out examples")
    epochs: float = Field(1.0, description="passes over the data")
    max_steps: int | None = Field(None, description="optimizer steps (overrides epochs)")
    batch_size: int = Field(1, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(16, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, description="peak learning rate")
    min_lr_ratio: float = Field(0.0, description="cosine floor as a share of lr")
    warmup_ratio: float = Field(0.03, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping norm (none: no clip)")
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit"] = Field(
        "auto", description="auto: paged 8-bit AdamW (bitsandbytes) on CUDA, else AdamW"
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: float = Field(32, description="LoRA alpha")
    lora_dropout: float = Field(0.05, description="LoRA dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            *("q_proj", "k_proj", "v_proj", "o_proj"),  # attention
            *("gate_proj", "up_proj", "down_proj"),  # MLP (Qwen2 / Llama / Mistral names)
        ],
        description="modules that get an adapter (comma-separated or repeated)",
    )
    neftune_alpha: float | None = Field(None, description="NEFTune noise, e.g. 5 (none: off)")
    gradient_checkpointing: bool = Field(True, description="recompute activations (less memory)")
    attn_implementation: str = Field("sdpa", description="sdpa, eager or flash_attention_2")
    seed: int = Field(0, description="seed for data order, eval split and LoRA init")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Dtype = Field("auto", description="auto is bfloat16 on CUDA, float32 on the CPU")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="cap on GPU memory, e.g. 24 to act as an RTX 4090"
    )
    eval_every: int | None = Field(None, description="eval loss every N steps (and first, last)")
    save_every: int | None = Field(None, description="checkpoint every N steps (for resume)")
    keep_checkpoints: int = Field(2, description="checkpoints kept")
    resume: bool = Field(False, description="continue from the last checkpoint in output")
    overwrite: bool = Field(False, description="replace an existing output folder")
    merge_base: str | None = Field(None, description="also fold the adapter into this 16-bit model")
    merge_output: Path | None = Field(
        None, description="where the merged model goes (none: OUTPUT-merged)"
    )
    merge_only: bool = Field(False, description="do not train: merge the adapter in output")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    progress: bool = Field(True, description="progress bars")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        return [m.strip() for item in items for m in str(item).split(",") if m.strip()]

    @model_validator(mode="after")
    def _a_model_and_data(self) -> TrainSettings:
        if self.merge_only and self.merge_base is None:
            raise ValueError("merge_only needs merge_base: the 16-bit model (--merge-base)")
        if not self.merge_only and (self.model is None or not self.data):
            raise ValueError(
                "training needs a model (--model) and at least one data source (--data)"
            )
        return self

    @property
    def merged_to(self) -> Path:
        """Where the merged model goes: merge_output, or OUTPUT-merged beside the adapter."""
        return self.merge_output or self.output.with_name(self.output.name + "-merged")
