"""Fewer, larger kernels per token: the loaded decoder rewired for inference.

- q/k/v become one `qkv_proj` GEMM and gate/up one `gate_up_proj` GEMM. A plain Linear gets the
  concatenated weights. An 8-bit GPTQ layer gets the checkpoint's packed tensors (qweight,
  scales, qzeros, bias) concatenated along output features, then its kernel's own set-up (the
  Marlin repack): exact, since the parts share the input width, group size and `g_idx`.
- On CUDA, Triton kernels replace the eager element-wise chains: RMSNorm, residual-add +
  RMSNorm and rotary embedding (Liger's) and SiLU-and-multiply (`mlp_kernels`, tiled over
  columns) are one kernel each instead of 4 to 10.
- In the engine's paged passes on CUDA, one kernel (`kernels.rope_write`) rotates the queries
  and keys straight out of the q/k/v GEMM's output and stores keys and values in the cache
  (instead of two copies, a rotary kernel and two scatters per layer), and each layer leaves
  its residual stream to the next layer's norm kernel (`Carry`) instead of adding it itself.

Only the layouts whose forward is known here are touched (Llama and Qwen2); anything else runs as
loaded. Projections wrapped by an adapter (peft LoRA) are not fused, nor GPTQ parts whose `g_idx`
differ (act-order checkpoints).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F

from onegpu.engine.gptq_layers import CheckpointTensors, gptq_from_checkpoint, is_gptq

log = logging.getLogger(__name__)

FUSABLE_TYPES = ("llama", "qwen2")


@dataclass(frozen=True, slots=True)
class Fusion:
    """What `fuse` changed: the layers rewired, the GEMMs saved per token, the element-wise ops."""

    layers: int
    gemms_saved: int
    kernels: str  # "liger" or "torch"


# -- element-wise ops: the model's own arithmetic, or one Triton kernel each ----------------------


class TorchOps:
    """The eager arithmetic transformers runs (the CPU path, and the reference in tests)."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        return norm(x)

    @staticmethod
    def add_rms_norm(x, residual, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x)."""
        total = residual + x
        return norm(total), total

    @staticmethod
    def rope(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class LigerOps:
    """Triton kernels (CUDA): Liger's norms and rotary, and SiLU-and-multiply of ours (Liger's
    arithmetic); same arithmetic and casts as the eager ops ("llama" casting), one launch."""

    name = "liger"

    @staticmethod
    def rms_norm(x, norm):
        from liger_kernel.ops.rms_norm import rms_norm_forward

        return rms_norm_forward(x, norm.weight, norm.variance_epsilon, 0.0, "llama", None)[0]

    @staticmethod
    def add_rms_norm(x, residual, norm):
        from liger_kernel.ops.fused_add_rms_norm import fused_add_rms_norm_forward

        out, total = fused_add_rms_norm_forward(
            x, residual, norm.weight, norm.variance_epsilon, 0.0, "llama"
        )[:2]
        return out, total

    @staticmethod
    def rope(q, k, cos, sin):
        from liger_kernel.ops.rope import rope_forward

        return rope_forward(q, k, cos, sin)[:2]

    @staticmethod
    def silu_mul(gate_up):
        from onegpu.engine.mlp_kernels import silu_mul

        return silu_mul(gate_up)  # Liger's arithmetic, its columns spread over programs


def pick_ops(device: torch.device) -> type[TorchOps] | type[LigerOps]:
    """Liger's kernels on CUDA when installed, else the eager arithmetic."""
    if device.type != "cuda":
        return TorchOps
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
    except ImportError:
        log.warning(
            "liger-kernel is not installed (pip install 'onegpu[cuda]'): norms and rotary run "
            "as eager ops, slower"
        )
        return TorchOps
    return LigerOps


# -- the fused forwards, bound to each layer's modules ---------------------------------------------


def _layer_forward(
    self,
    hidden_states,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
):
    ops, carry = self.onegpu_ops, self.onegpu_carry
    if carry is not None and carry.residual is not None and not self.onegpu_first:
        # The previous layer's MLP output, and the residual stream it did not add to it.
        normed, hidden_states = ops.add_rms_norm(
            hidden_states, carry.residual, self.input_layernorm
        )
    else:
        normed = ops.rms_norm(hidden_states, self.input_layernorm)
    attn, _ = self.self_attn(
        hidden_states=normed,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden, residual = ops.add_rms_norm(attn, hidden_states, self.post_attention_layernorm)
    if carry is None:
        return residual + self.mlp(hidden)
    carry.residual = residual  # added by the next layer's norm kernel, or the final norm's
    return self.mlp(hidden)


class Carry:
    """The residual stream between fused layers: each layer returns its MLP output alone and
    leaves the residual here, and the next norm adds the two in its own kernel (one launch per
    layer fewer). Set during a forward pass, consumed by the model's final norm."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None


class FinalNorm(torch.nn.Module):
    """The model's last norm, adding the residual the last layer left in `carry` first."""

    def __init__(self, norm: torch.nn.Module, ops, carry: Carry) -> None:
        super().__init__()
        self.norm, self.ops, self.carry = norm, ops, carry

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual, self.carry.residual = self.carry.residual, None
        if residual is None:
            return self.ops.rms_norm(hidden_states, self.norm)
        return self.ops.add_rms_norm(hidden_states, residual, self.norm)[0]


def _attention_forward(
    self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs
):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    shape = hidden_states.shape[:-1]
    qkv = self.qkv_proj(hidden_states)
    paged = kwargs.get("onegpu_pass")
    if (
        self.onegpu_rope_write
        and paged is not None
        and paged.triton
        and paged.cache.kv_dtype != "int8"
    ):
        q, k, v = _rope_into_cache(self, qkv, position_embeddings, paged), None, None
    else:
        q, k, v = qkv.split(self.onegpu_qkv_sizes, dim=-1)
        q = q.view(*shape, -1, self.head_dim).transpose(1, 2)
        k = k.view(*shape, -1, self.head_dim).transpose(1, 2)
        v = v.view(*shape, -1, self.head_dim).transpose(1, 2)
        q, k = self.onegpu_ops.rope(q, k, *position_embeddings)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    window = getattr(self, "sliding_window", None)
    out, weights = interface(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0,
        scaling=self.scaling,
        **({"sliding_window": window} if window else {}),
        **kwargs,
    )
    return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def _rope_into_cache(attention, qkv, position_embeddings, paged) -> torch.Tensor:
    """The queries [B, Hq, T, D], rotated by one kernel that also stores the rotated keys and
    the values in the paged cache (the attention then finds them there)."""
    from onegpu.engine.kernels import rope_write

    *shape, width = qkv.shape
    q_size, k_size, _ = attention.onegpu_qkv_sizes
    dim = attention.head_dim
    rows = qkv.reshape(-1, width)
    like = rows[:, q_size : q_size + k_size].unflatten(1, (-1, dim))  # [N, Hkv, D]
    layer = paged.cache.layer(attention.layer_idx, like)
    cos, sin = (t.reshape(-1, dim) for t in position_embeddings)
    q = rope_write(rows, cos, sin, paged.slots, layer, q_size // dim)
    return q.view(*shape, -1, dim).transpose(1, 2)


def _mlp_forward(self, x):
    return self.down_proj(self.onegpu_ops.silu_mul(self.gate_up_proj(x)))


# -- fusing projections ---------------------------------------------------------------------------


def fuse_linears(
    parts: dict[str, torch.nn.Module], checkpoint: CheckpointTensors | None
) -> torch.nn.Module | None:
    """One layer computing `parts` (name -> module, in output order) side by side, or None.

    None when the parts cannot be joined exactly: mixed kinds or biases, adapter wrappers, GPTQ
    parts with different `g_idx` or settings, or GPTQ without its checkpoint.
    """
    modules = list(parts.values())
    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        return None
    if len({m.bias is None for m in modules}) != 1:
        return None
    if type(first) is torch.nn.Linear:
        fused = torch.nn.Linear(
            first.in_features,
            sum(m.out_features for m in modules),
            bias=first.bias is not None,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in modules]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in modules]))
        return fused.requires_grad_(False)
    if is_gptq(first) and checkpoint is not None:
        settings = ("bits", "requested_group_size", "desc_act", "sym", "in_features", "pack_dtype")
        if any(getattr(m, s) != getattr(first, s) for m in modules for s in settings):
            return None
        return gptq_from_checkpoint(first, list(parts), checkpoint)
    return None


# -- the model ------------------------------------------------------------------------------------


def _carry_residuals(model, layers, ops, *, fused: int) -> None:
    """Pass the residual stream from layer to layer apart from the MLP output (`Carry`), when
    every layer and the final norm are ones whose forward is known here."""
    norm = getattr(model.model, "norm", None)
    if fused != len(layers) or not hasattr(norm, "variance_epsilon"):
        return
    carry = Carry()
    for layer in layers:
        layer.onegpu_carry = carry
    model.model.norm = FinalNorm(norm, ops, carry)


def _rope_write_works(model, layers, device: torch.device) -> bool:
    """Whether the rotary-store kernel checks out on this GPU for this model's heads (always
    on the CPU, where only tests run it, in Triton's interpreter)."""
    attention = layers[0].self_attn
    sizes = getattr(attention, "onegpu_qkv_sizes", None)
    if device.type != "cuda" or sizes is None:
        return True
    from onegpu.engine.kernels import check_rope_write

    dim = attention.head_dim
    dtype = next(model.parameters()).dtype
    problem = check_rope_write(sizes[0] // dim, sizes[1] // dim, dim, dtype, device)
    if problem:
        log.warning("rotary + KV store kernel not used (separate kernels instead): %s", problem)
    return problem is None


def fuse(model: torch.nn.Module, *, checkpoint: Path | None = None) -> Fusion | None:
    """Rewire `model`'s decoder layers in place; None when its layout is not one known here.

    `checkpoint`: the local folder of a GPTQ model (its packed tensors are read again from it).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSABLE_TYPES:
        log.info("model type %r: projections and norms run as loaded", model_type)
        return None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    device = next(model.parameters()).device
    ops = pick_ops(device)
    tensors = CheckpointTensors(checkpoint) if checkpoint is not None else None
    # Names only: a map holding the modules themselves would keep every replaced one alive.
    wanted = {id(layer) for layer in layers}
    layer_names = {id(m): name for name, m in model.named_modules() if id(m) in wanted}
    saved = 0
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        prefix = layer_names[id(layer)]
        qkv = fuse_linears(
            {
                f"{prefix}.self_attn.{part}": getattr(attention, part)
                for part in ("q_proj", "k_proj", "v_proj")
            },
            tensors,
        )
        gate_up = (
            fuse_linears(
                {f"{prefix}.mlp.{part}": getattr(mlp, part) for part in ("gate_proj", "up_proj")},
                tensors,
            )
            if config.hidden_act == "silu"
            else None
        )
        if qkv is None or gate_up is None:
            log.warning("layer %s cannot be fused: it runs as loaded", prefix)
            continue
        attention.onegpu_qkv_sizes = [
            attention.q_proj.out_features,
            attention.k_proj.out_features,
            attention.v_proj.out_features,
        ]
        del attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj
        attention.qkv_proj, mlp.gate_up_proj = qkv, gate_up
        for module, forward in (
            (layer, _layer_forward),
            (attention, _attention_forward),
            (mlp, _mlp_forward),
        ):
            module.onegpu_ops = ops
            module.forward = MethodType(forward, module)
        layer.onegpu_carry, layer.onegpu_first = None, layer is layers[0]
        saved += 3
    _carry_residuals(model, layers, ops, fused=saved // 3)
    rope_write = _rope_write_works(model, layers, device)
    for layer in layers:
        layer.self_attn.onegpu_rope_write = rope_write
    if device.type == "cuda":
        # GPTQModel's torch-kernel layers hold a reference to themselves: only the collector
        # frees the replaced ones (else their GPU memory stays taken until it runs).
        gc.collect()
        torch.cuda.empty_cache()
    fusion = Fusion(layers=saved // 3, gemms_saved=saved, kernels=ops.name)
    log.warning(
        "fused %d of %d layers: %d fewer GEMMs per token, %s norm/rotary kernels",
        fusion.layers,
        len(layers),
        fusion.gemms_saved,
        fusion.kernels,
    )
    return fusion
