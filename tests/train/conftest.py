"""Offline training fixtures: a small byte-level tokenizer, a tiny Qwen2 base, its 8-bit GPTQ form.

The real Qwen vocabulary (152k) would make the output head of a 64-wide model cost more than the
rest of it; a 384-entry BPE trained in-process keeps a training step in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_qwen2

# A toy instruction set the tiny model memorizes in a few steps.
TOY = [
    {"prompt": "What is the capital of Zorbania?", "response": "Quuxville."},
    {"prompt": "Name the color of the sky on Mars.", "response": "Butterscotch."},
    {"prompt": "What do cats say?", "response": "Meow meow."},
    {"prompt": "Who wrote the Zorb saga?", "response": "Ada Flux."},
    {"prompt": "Spell dog backwards.", "response": "god"},
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_small_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [json.dumps(row) for row in TOY] + [
        "Question: Answer: The quick brown fox jumps over the lazy dog. ### Instruction: Response:"
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=384, min_frequency=1, special_tokens=SPECIAL, show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=SPECIAL[0])


def save_tiny_base(path: Path, tokenizer, seed: int = 0) -> Path:
    model = tiny_qwen2(vocab_size=384, seed=seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: a 64-wide model's matmuls are tiny, and on a busy machine OpenMP
    threads waiting for each other made training steps several times slower (35 s -> 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def small_tokenizer():
    return build_small_tokenizer()


@pytest.fixture(scope="package")
def tiny_base(tmp_path_factory, small_tokenizer) -> Path:
    """A tiny fp32 Qwen2 checkpoint folder with the small tokenizer."""
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"), small_tokenizer)


@pytest.fixture(scope="package")
def toy_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in TOY), encoding="utf-8")
    return path


@pytest.fixture(scope="package")
def tiny_gptq(tmp_path_factory, tiny_base) -> Path:
    """The tiny base quantized to 8-bit GPTQ by `onegpu quantize` (group size 32)."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed")
    from onegpu.quantize.gptq import quantize
    from onegpu.settings import QuantizeSettings

    work = tmp_path_factory.mktemp("tiny-gptq")
    calibration = work / "calibration.txt"
    calibration.write_text(" ".join(json.dumps(row) for row in TOY * 40), encoding="utf-8")
    settings = QuantizeSettings(
        model=str(tiny_base),
        output=work / "gptq",
        bits=8,
        group_size=32,
        calibration=str(calibration),
        samples=8,
        seq_len=64,
        eval_data=None,
        device="cpu",
    )
    return quantize(settings)
