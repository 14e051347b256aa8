"""fusion.py: one GEMM for q/k/v and one for gate/up, fused norms and rotary.

Each test compares the rewired model (or engine) with the model as loaded: the same logits
within rounding and the same greedy tokens. On CUDA the element-wise ops are Liger's Triton
kernels and GPTQ layers run on Marlin; on the CPU they are the eager ops and GPTQ's torch kernel.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from onegpu.engine.fusion import FinalNorm, TorchOps, fuse, fuse_linears, pick_ops
from onegpu.engine.gptq_layers import CheckpointTensors, gptq_from_checkpoint, load_quantized_head
from onegpu.engine.types import GenerationRequest
from tests.conftest import DEVICES, make_engine, tiny_qwen2
from tests.engine.test_batching import run_interleaved

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize(
    "parts, joins",
    [
        ([linear(8, 16, True), linear(8, 4, True), linear(8, 4, True)], True),
        ([linear(8, 12, False), linear(8, 12, False)], True),
        ([linear(8, 16, True), linear(8, 4, False)], False),  # one has a bias, one not
        ([linear(8, 16, False), nn.Identity()], False),  # not the same kind of layer
    ],
)
def test_fuse_linears_joins_only_what_it_can_join_exactly(parts, joins):
    torch.manual_seed(0)
    fused = fuse_linears({f"p{i}": p for i, p in enumerate(parts)}, checkpoint=None)
    assert (fused is not None) == joins
    if joins:
        x = torch.randn(3, 8)
        expected = torch.cat([p(x) for p in parts], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-6)


def test_pick_ops_uses_eager_arithmetic_off_cuda():
    assert pick_ops(torch.device("cpu")) is TorchOps


def test_unknown_layouts_run_as_loaded():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    before = [name for name, _ in model.named_modules()]
    assert fuse(model) is None
    assert [name for name, _ in model.named_modules()] == before


@pytest.mark.parametrize("device", DEVICES)
def test_fused_tiny_qwen2_gives_the_same_logits_and_tokens(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = tiny_qwen2(vocab_size=1000).to(device, dtype)
    fused = copy.deepcopy(model)
    report = fuse(fused)
    assert report is not None and report.layers == 2 and report.gemms_saved == 6
    liger = importlib.util.find_spec("liger_kernel") is not None  # the `cuda` extra
    assert report.kernels == ("liger" if device == "cuda" and liger else "torch")
    attention = fused.model.layers[0].self_attn
    assert hasattr(attention, "qkv_proj") and not hasattr(attention, "q_proj")
    assert isinstance(fused.model.norm, FinalNorm)  # the residual stream goes layer to layer
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected, got = model(ids).logits.float(), fused(ids).logits.float()
    tolerance = 2e-2 if device == "cuda" else 1e-5  # fp16 rounding of a different op order
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids[:1], **greedy), fused.generate(ids[:1], **greedy))


def test_a_residual_left_by_a_failed_pass_does_not_reach_the_next():
    """A pass that stops half-way leaves a residual in the carry; the next pass starts at the
    first layer, which never adds it."""
    model = tiny_qwen2(vocab_size=1000)
    fuse(model)
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        model.model.norm.carry.residual = torch.full((1, 7, 64), 1e4)
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert model.model.norm.carry.residual is None  # the final norm consumed what it added


PROMPTS = [
    "The capital of France is",
    "Question: what is 2 + 2?\nAnswer:",
    "Once upon a time, in a land far away, there lived",
]


def _answers(engine) -> list[list[tuple[str, float]]]:
    """Each prompt's greedy tokens with their logprobs, decoded together."""
    requests = [
        GenerationRequest(prompt=p, max_new_tokens=16, temperature=0.0, top_k_per_token=3)
        for p in PROMPTS
    ]
    results = run_interleaved(engine, requests, join_every=1)
    return [[(t.text, t.logprob) for t in r.tokens] for r in results]


# float16 logits of magnitude 16-32 are 0.016 apart: an exact-arithmetic kernel swap (another
# reduction order) moves a logprob by about that much; float32 keeps the 1e-3 target.
TOLERANCES = {torch.float32: 1e-3, torch.float16: 0.05}
CUDA_MARKS = DEVICES[1].marks
ENGINE_CASES = [
    pytest.param("cpu", torch.float32, 1e-5, id="cpu"),
    *(
        pytest.param("cuda", dtype, TOLERANCES[dtype], marks=CUDA_MARKS, id=f"cuda-{name}")
        for dtype, name in ((torch.float32, "float32"), (torch.float16, "float16"))
    ),
]


def _same_answers(expected, got, tolerance: float) -> None:
    for a, b in zip(expected, got, strict=True):
        assert [text for text, _ in b] == [text for text, _ in a]
        worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
        assert worst <= tolerance, f"logprobs differ by {worst:.2e} (> {tolerance})"


@pytest.mark.parametrize("device, dtype, tolerance", ENGINE_CASES)
def test_engine_on_a_fused_tiny_qwen2_answers_as_on_the_loaded_one(
    device, dtype, tolerance, qwen_tokenizer
):
    model = tiny_qwen2(vocab_size=len(qwen_tokenizer)).to(device, dtype)
    fused = copy.deepcopy(model)
    fuse(fused)
    expected = _answers(make_engine(model, qwen_tokenizer, device=device, max_batch=4))
    got = _answers(make_engine(fused, qwen_tokenizer, device=device, max_batch=4))
    _same_answers(expected, got, tolerance)


def test_the_rotary_kernel_stores_what_the_model_computes(qwen_tokenizer):
    """With Triton kernels (its interpreter on a CPU) the fused model's rotary kernel also
    stores the keys and values in the pool (`kernels.rope_write`): it answers as the loaded
    model does with the reference attention."""
    model = tiny_qwen2(vocab_size=len(qwen_tokenizer))
    fused = copy.deepcopy(model)
    fuse(fused)
    expected = _answers(make_engine(model, qwen_tokenizer, max_batch=4, triton=False))
    got = _answers(make_engine(fused, qwen_tokenizer, max_batch=4, triton=True))
    _same_answers(expected, got, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_the_embedded_smollm2_answers_the_same_fused(device):
    """The real embedded model (Llama layout), as `serve` loads it: float32 on CPU, fp16 on CUDA."""
    from onegpu.engine.embedded import EmbeddedModelMissingError, embedded_model_dir
    from onegpu.engine.loading import EngineConfig, load_engine

    # `make setup` installs it (93 MB); the GPU machine gets only the carried wheels (64 MiB).
    try:
        embedded_model_dir()
    except EmbeddedModelMissingError:
        pytest.skip("the embedded model package is not installed")
    plain, joined = (
        load_engine(EngineConfig(device=device, fuse=fuse_it)) for fuse_it in (False, True)
    )
    assert hasattr(joined.model.model.layers[0].self_attn, "qkv_proj")
    tolerance = TOLERANCES[torch.float16] if device == "cuda" else 1e-4
    _same_answers(_answers(plain), _answers(joined), tolerance)


# -- GPTQ ------------------------------------------------------------------------------------------

GROUP = 32


def write_gptq_checkpoint(folder: Path, model: nn.Module, tokenizer=None) -> Path:
    """`model` saved as a symmetric 8-bit GPTQ checkpoint (v1 layout) with random packed weights.

    Scales of 1/(128 * sqrt(in)) keep activations finite; the zero points are 128, stored as
    127 in each byte of qzeros, as GPTQModel writes them.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    for name in list(state):
        if name.rsplit(".", 2)[-2] not in LINEARS or not name.endswith(".weight"):
            continue
        n_out, n_in = state.pop(name).shape
        prefix = name.removesuffix(".weight")
        state[f"{prefix}.qweight"] = torch.randint(
            -(2**31), 2**31 - 1, (n_in // 4, n_out), dtype=torch.int32, generator=gen
        )
        groups = n_in // GROUP
        scale = 1.0 / (128 * n_in**0.5)
        state[f"{prefix}.scales"] = (
            torch.rand(groups, n_out, generator=gen) * scale + scale / 2
        ).half()
        state[f"{prefix}.qzeros"] = torch.full((groups, n_out // 4), 0x7F7F7F7F, dtype=torch.int32)
        state[f"{prefix}.g_idx"] = torch.arange(n_in, dtype=torch.int32) // GROUP
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict() | {
        "dtype": "float16",
        "quantization_config": {
            "quant_method": "gptq",
            "bits": 8,
            "group_size": GROUP,
            "sym": True,
            "desc_act": False,
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def tiny_gptq_source(vocab_size: int) -> nn.Module:
    """A 2-layer Qwen2 whose widths suit Marlin's tiles (in and out multiples of 64)."""
    return tiny_qwen2(vocab_size, hidden=128)


def load_gptq(folder: Path, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from onegpu.engine.loading import _gptq_kwargs, read_quantization

    kwargs = _gptq_kwargs(read_quantization(folder), torch.device(device))
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float16, device_map={"": device}, **kwargs
    ).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gptq_layers_give_the_same_logits(device, tmp_path):
    pytest.importorskip("gptqmodel", reason="needs gptqmodel (make test installs it)")
    folder = write_gptq_checkpoint(tmp_path / "gptq", tiny_gptq_source(vocab_size=512))
    model, fused = load_gptq(folder, device), load_gptq(folder, device)
    tensors = CheckpointTensors(folder)
    assert not load_quantized_head(model, folder)  # its head is not quantized: left as loaded
    template = model.model.layers[0].self_attn.q_proj
    assert gptq_from_checkpoint(template, ["model.layers.0.no_such_proj"], tensors) is None
    assert gptq_from_checkpoint(template, ["x"], CheckpointTensors(tmp_path)) is None  # no files
    kernel = type(model.model.layers[0].self_attn.q_proj)
    report = fuse(fused, checkpoint=folder)
    assert report is not None and report.layers == 2
    assert type(fused.model.layers[0].self_attn.qkv_proj) is kernel
    assert type(fused.model.layers[0].mlp.gate_up_proj) is kernel
    ids = torch.randint(0, 512, (1, 13), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        expected, got = model(ids).logits.float(), fused(ids).logits.float()
    scale = expected.abs().max().item()
    assert scale > 0.1  # the weights are not all zero: a wrong join would show
    # A zero point off by one (the v1/v2 layouts mixed up) moves logits by ~3% of the scale.
    tolerance = (1e-2 if device == "cuda" else 1e-4) * scale
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


def test_serving_a_gptq_checkpoint_fuses_it(tmp_path, qwen_tokenizer):
    pytest.importorskip("gptqmodel", reason="needs gptqmodel (make test installs it)")
    from onegpu.engine.loading import EngineConfig, load_engine

    source = tiny_gptq_source(vocab_size=len(qwen_tokenizer))
    folder = write_gptq_checkpoint(tmp_path / "gptq", source, qwen_tokenizer)
    plain, joined = (
        load_engine(EngineConfig(model=str(folder), device="cpu", fuse=fuse_it))
        for fuse_it in (False, True)
    )
    assert hasattr(joined.model.model.layers[1].mlp, "gate_up_proj")
    assert hasattr(plain.model.model.layers[1].mlp, "gate_proj")
    _same_answers(_answers(plain), _answers(joined), tolerance=1e-3)
