"""GPTQ layers built from a checkpoint's packed tensors, beside transformers' own GPTQ loading.

Two things transformers' loader cannot do, both done here the same way (read the packed tensors
again, build a layer of the kernel class the loader chose, run the kernel's own set-up):
- one layer for several (q/k/v, gate/up): their tensors side by side along output features;
- a quantized `lm_head`: the loader converts only the decoder blocks, so a checkpoint whose head
  was quantized too (`onegpu quantize --lm-head`) would otherwise get a fresh random head.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GPTQ_FIELDS = ("qweight", "scales", "qzeros", "g_idx")


class CheckpointTensors:
    """Named tensors of a local safetensors checkpoint (one file, or sharded with an index)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        self._files: dict[str, Path] = {}  # none: another format (.bin), nothing to build from
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: folder / file for name, file in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), single)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)


def gptq_config(quantization: dict, backend: str):
    """transformers' GPTQConfig loading a checkpoint whose config.json `quantization_config`
    is `quantization`, with GPTQModel's `backend` kernel (marlin, torch, ...)."""
    from transformers import GPTQConfig

    return GPTQConfig(
        bits=quantization["bits"], group_size=quantization.get("group_size", 128), backend=backend
    )


def is_gptq(module: torch.nn.Module) -> bool:
    """A GPTQModel quantized linear layer (any kernel)."""
    return all(hasattr(module, field) for field in GPTQ_FIELDS) and hasattr(module, "post_init")


def gptq_from_checkpoint(
    template: torch.nn.Module, names: list[str], checkpoint: CheckpointTensors
) -> torch.nn.Module | None:
    """One layer of `template`'s kernel class computing the checkpoint layers `names` side by side.

    Exact: the packed tensors are concatenated along output features before the kernel's set-up
    (`post_init`: Marlin's repack). None when the checkpoint lacks a tensor (other names, or not
    safetensors) or the layers' `g_idx` differ (act-order checkpoints).
    """
    if any(f"{name}.{field}" not in checkpoint for name in names for field in GPTQ_FIELDS):
        return None
    raw = {field: [checkpoint.get(f"{name}.{field}") for name in names] for field in GPTQ_FIELDS}
    if any(not torch.equal(g, raw["g_idx"][0]) for g in raw["g_idx"]):
        return None
    biased = all(f"{name}.bias" in checkpoint for name in names)
    device = template.qweight.device
    dtype = getattr(template, "compute_dtype", None) or template.scales.dtype
    layer = type(template)(
        bits=template.bits,
        group_size=template.requested_group_size,
        desc_act=template.desc_act,
        sym=template.sym,
        in_features=raw["g_idx"][0].numel(),
        out_features=sum(q.shape[1] for q in raw["qweight"]),
        bias=biased,
        pack_dtype=template.pack_dtype,
        backend=template.backend,
        format=getattr(template, "format", None),
        register_buffers=True,
        dtype=dtype,
        name=",".join(names),
        lm_head_name="lm_head",  # Marlin makes the head's input contiguous
    )
    tensors = {
        "qweight": torch.cat(raw["qweight"], dim=1),
        "scales": torch.cat(raw["scales"], dim=1).to(dtype),
        "qzeros": torch.cat(raw["qzeros"], dim=1),
        "g_idx": raw["g_idx"][0],
    }
    if biased:
        tensors["bias"] = torch.cat([checkpoint.get(f"{name}.bias") for name in names]).to(dtype)
    for field, tensor in tensors.items():
        if isinstance(getattr(layer, field), torch.nn.Parameter):
            setattr(layer, field, torch.nn.Parameter(tensor.to(device), requires_grad=False))
        else:
            setattr(layer, field, tensor.to(device))
    layer.to(device)
    if getattr(layer, "REQUIRES_FORMAT_V2", False) and _is_v1(template):
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

        convert_gptq_v1_to_v2_format_module(layer, bits=layer.bits, pack_dtype=layer.pack_dtype)
    layer.post_init()
    return layer.eval()


def _is_v1(module) -> bool:
    """GPTQ checkpoints are stored in the v1 layout (zero points minus one) unless marked v2."""
    return str(getattr(module, "format", "gptq")).lower().removeprefix("format.") != "gptq_v2"


def load_quantized_head(model: torch.nn.Module, folder: Path) -> bool:
    """Give `model` the quantized `lm_head` its checkpoint holds, if it holds one (True then)."""
    tensors = CheckpointTensors(folder)
    if "lm_head.qweight" not in tensors:
        return False
    template = next((m for m in model.modules() if is_gptq(m)), None)
    if template is None:
        raise ValueError(f"{folder} has a quantized lm_head but no other GPTQ layer was loaded")
    head = gptq_from_checkpoint(template, ["lm_head"], tensors)  # one layer: never None
    model.lm_head = head
    log.warning("lm_head: %d-bit GPTQ from the checkpoint", head.bits)
    return True
