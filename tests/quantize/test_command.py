"""`onegpu quantize` end to end on CPU: a Qwen v1 checkpoint is converted, quantized and served."""

from __future__ import annotations

import json
import math

import pytest

from onegpu.cli import main
from onegpu.engine.loading import EngineConfig, load_engine
from onegpu.engine.types import GenerationRequest
from onegpu.quantize.qwen_v1 import is_qwen_v1
from tests.quantize.test_gptq import word_text
from tests.quantize.test_qwen_v1 import TINY_V1, tiny_v1_state, write_v1_checkpoint


@pytest.mark.parametrize(
    ("config", "v1"),
    [
        ({"model_type": "qwen", "architectures": ["QWenLMHeadModel"]}, True),
        ({"architectures": ["QWenLMHeadModel"]}, True),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, False),
        ({"model_type": "llama"}, False),
        ({}, False),
    ],
)
def test_is_qwen_v1(config, v1):
    assert is_qwen_v1(config) is v1


@pytest.mark.slow
def test_cli_converts_quantizes_and_the_server_engine_answers(tmp_path):
    pytest.importorskip("gptqmodel", reason="needs the quantize extra (gptqmodel)")
    source = write_v1_checkpoint(tmp_path / "qwen-v1", TINY_V1, tiny_v1_state(TINY_V1))
    calibration = tmp_path / "calib.txt"
    calibration.write_text(word_text(3000, seed=3), encoding="utf-8")
    output = tmp_path / "q8"
    argv = ["quantize", str(source), "--output", str(output), "--calibration", str(calibration)]
    argv += ["--samples", "8", "--seq-len", "32", "--group-size", "32", "--device", "cpu"]
    argv += ["--eval-data", "none"]
    assert main(argv) == 0

    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["quantization_config"]["bits"] == 8
    assert json.loads((tmp_path / "q8.qwen2" / "config.json").read_text())["model_type"] == "qwen2"
    assert not list(output.glob("*.py")), "no remote code may travel with the checkpoint"

    engine = load_engine(EngineConfig(model=str(output), device="cpu", max_context=32))
    assert engine.info.quantization == "gptq-8bit"
    completion = engine.generate(
        GenerationRequest(prompt="hello", max_new_tokens=4, min_new_tokens=4, temperature=0)
    )
    assert completion.new_tokens == 4
    assert all(math.isfinite(t.logprob) for t in completion.tokens)
