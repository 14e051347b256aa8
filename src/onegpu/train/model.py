"""The base model for training, its LoRA adapter, and merging: every peft, GPTQModel and
bitsandbytes call made while training is in this module.

Three kinds of base:
- `gptq`: an 8-bit GPTQ checkpoint from `onegpu quantize`, loaded with GPTQModel's `torch` kernel.
  It dequantizes a layer's weight and multiplies with `torch.matmul`, so autograd carries
  gradients through the frozen quantized layers to the adapters below them, on the CPU and on CUDA
  (where the dequantization runs in Triton). Marlin, the serving kernel, has no backward pass
  (GPTQModel refuses to put it in training mode), so training never uses it; the adapter trained
  here is served on top of Marlin all the same, since LoRA only adds to each layer's output.
- `nf4`: a 16-bit checkpoint quantized to 4-bit NF4 while loading (bitsandbytes, classic QLoRA:
  double quantization, bf16 compute). bitsandbytes' 4-bit kernels need a CUDA GPU.
- `none`: the checkpoint as it is (bf16 on a GPU, fp32 on the CPU): small models and tests.

Base weights are frozen and kept in their own dtype (no fp32 copies of the embeddings, unlike
`peft.prepare_model_for_kbit_training`: on a 14B model those copies cost 6 GB); LoRA weights are
fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onegpu.device import cap_gpu_memory, resolve_device, resolve_dtype
from onegpu.engine.gptq_layers import gptq_config
from onegpu.errors import UserError

log = logging.getLogger(__name__)

# GPTQModel's kernel with a backward pass on every device (see the module docstring).
TRAIN_BACKEND = "torch"
QUANTIZATIONS = ("auto", "gptq", "nf4", "none")


class TrainModelError(UserError):
    """The base model or its adapter cannot be set up for training as configured."""


@dataclass
class TrainBase:
    """A loaded base model ready for an adapter, and what it is."""

    model: Any  # a transformers causal LM
    tokenizer: Any
    kind: str  # "gptq" | "nf4" | "none"
    device: torch.device
    dtype: torch.dtype
    quantization: dict[str, Any] | None  # the checkpoint's quantization_config, if any

    def describe(self) -> dict[str, Any]:
        q = self.quantization or {}
        return {
            "kind": self.kind,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "bits": {"gptq": q.get("bits"), "nf4": 4}.get(self.kind),
            "group_size": q.get("group_size") if self.kind == "gptq" else None,
            "kernel": {"gptq": f"gptqmodel:{TRAIN_BACKEND}", "nf4": "bitsandbytes"}.get(self.kind),
            "architecture": (getattr(self.model.config, "architectures", None) or [None])[0],
        }


def resolve_kind(quantization: str, checkpoint_quantization: dict[str, Any] | None) -> str:
    """Which kind of base to build from the user's choice and the checkpoint's own config."""
    if quantization not in QUANTIZATIONS:
        raise TrainModelError(f"quantization must be one of {QUANTIZATIONS}; got {quantization!r}")
    method = (checkpoint_quantization or {}).get("quant_method")
    if method is not None and method != "gptq":
        raise TrainModelError(f"checkpoints quantized with {method!r} are not supported")
    if quantization == "auto":
        return "gptq" if method == "gptq" else "none"
    if quantization == "gptq" and method != "gptq":
        raise TrainModelError("quantization 'gptq' needs a GPTQ checkpoint (from onegpu quantize)")
    if quantization in ("nf4", "none") and method == "gptq":
        raise TrainModelError(
            f"the checkpoint is already GPTQ-quantized; quantization {quantization!r} needs the "
            "16-bit model (or use 'auto'/'gptq' to train on the GPTQ checkpoint)"
        )
    return quantization


def load_base(
    model: str | Path,
    *,
    quantization: str,
    device: str,
    dtype: str,
    attn_implementation: str,
    gradient_checkpointing: bool,
    revision: str | None = None,
    gpu_memory_gib: float | None = None,
    trust_remote_code: bool = False,
) -> TrainBase:
    """Load the base model (GPTQ, NF4 or as is) frozen, with gradient checkpointing on."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    # bf16 on GPUs: fp16 activations overflow in long training runs and would need loss scaling.
    torch_dtype = resolve_dtype(dtype, dev, cuda_default=torch.bfloat16)
    hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(str(model), **hub)
    except (OSError, ValueError) as exc:
        raise TrainModelError(f"cannot read the config of {str(model)!r}: {exc}") from exc
    checkpoint_quant = getattr(config, "quantization_config", None)
    if checkpoint_quant is not None and not isinstance(checkpoint_quant, dict):
        checkpoint_quant = checkpoint_quant.to_dict()
    kind = resolve_kind(quantization, checkpoint_quant)

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "device_map": {"": str(dev)},
        "attn_implementation": attn_implementation,
        **hub,
    }
    if kind == "gptq":
        kwargs["quantization_config"] = _gptq_config(checkpoint_quant)
    elif kind == "nf4":
        kwargs["quantization_config"] = _nf4_config(dev, torch_dtype)
    cap_gpu_memory(dev, gpu_memory_gib)

    log.warning("loading base %s for training (%s, %s on %s)", model, kind, torch_dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model), **hub)
        lm = AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise TrainModelError(f"cannot load {str(model)!r} for training: {exc}") from exc
    lm.config.use_cache = False
    for param in lm.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the base is frozen).
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return TrainBase(lm, tokenizer, kind, dev, torch_dtype, checkpoint_quant)


def _gptq_config(quant: dict[str, Any]):
    try:
        import gptqmodel  # noqa: F401  (transformers needs it to load GPTQ checkpoints)
    except ImportError as exc:
        raise TrainModelError(
            "training on a GPTQ checkpoint needs gptqmodel: pip install 'onegpu[train]', then "
            "pip install --no-deps gptqmodel==7.6.0"
        ) from exc
    return gptq_config(quant, TRAIN_BACKEND)


def _nf4_config(device: torch.device, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if device.type != "cuda":
        raise TrainModelError(
            "4-bit NF4 (bitsandbytes) needs a CUDA GPU; on this machine train on the 8-bit GPTQ "
            "checkpoint from `onegpu quantize` or on the model as it is (quantization 'none')"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TrainModelError("4-bit NF4 needs bitsandbytes: pip install 'onegpu[train]'") from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype,
    )


def add_lora(
    model,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
):
    """Wrap `model` in a peft LoRA model; only the LoRA weights (fp32) are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches the targets
        raise TrainModelError(f"cannot add LoRA to the model: {exc}") from exc
    return peft_model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def base_of(model):
    """The transformers model inside a peft model (where the decoder and the head are)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_adapter(model, path: Path) -> None:
    """Write the adapter folder (adapter_config.json, adapter_model.safetensors)."""
    model.save_pretrained(str(path))


def load_adapter_weights(model, path: Path) -> None:
    """Load saved LoRA weights into an existing peft model (resuming from a checkpoint)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainModelError(
            f"the checkpoint {path} does not match this adapter: {unexpected[:3]}"
        )


def merge_adapter(
    adapter: Path,
    base: str | Path,
    output: Path,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    revision: str | None = None,
) -> Path:
    """Fold the adapter into the 16-bit base's weights and save a plain checkpoint at `output`.

    Use the 16-bit model that the quantized base was made from, then run `onegpu quantize` on the
    result: serving needs no adapter then. (An adapter cannot be folded into GPTQ integers.)
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, cuda_default=torch.bfloat16)
    config = _read_config(base, revision)
    if config.get("quantization_config"):
        raise TrainModelError(
            f"{base} is quantized: merge into the 16-bit model it was made from, then quantize"
        )
    log.warning("merging %s into %s (%s on %s)", adapter, base, torch_dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch_dtype, device_map={"": str(dev)}, revision=revision
    )
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        from onegpu.engine.loading import adapter_base

        raise TrainModelError(
            f"the adapter {adapter} does not fit {base}: it was trained on "
            f"{adapter_base(adapter)!r}; merge it into the 16-bit model that base was made from"
        ) from exc
    output = Path(output)
    merged.save_pretrained(output)
    AutoTokenizer.from_pretrained(str(base), revision=revision).save_pretrained(output)
    return output


def _read_config(model: str | Path, revision: str | None) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model), revision=revision).to_dict()
