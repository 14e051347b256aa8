"""Start-up failures end the process with a non-zero status and a message (no half-up server)."""

import subprocess
import sys

import pytest

from tests.live import free_port

pytestmark = pytest.mark.slow


def serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "onegpu.cli", "serve", "--port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_missing_model_folder_exits_non_zero_with_a_message(tmp_path):
    result = serve("--model", str(tmp_path / "no-such-model"), "--device", "cpu")
    assert result.returncode != 0
    assert "cannot load model" in result.stderr


def test_a_bad_adapter_exits_non_zero_with_a_message(tmp_path):
    (tmp_path / "adapter").mkdir()
    result = serve("--adapter", str(tmp_path / "adapter"), "--device", "cpu")
    assert result.returncode != 0
    assert "cannot load adapter" in result.stderr


def test_incompatible_quantization_metadata_exits_non_zero(tmp_path, tiny_qwen_model):
    folder = tmp_path / "model"
    tiny_qwen_model.save_pretrained(folder)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(
        config.replace(
            '"model_type"', '"quantization_config": {"quant_method": "gptq"}, "model_type"', 1
        )
    )
    result = serve("--model", str(folder), "--device", "cpu")
    assert result.returncode != 0
    assert "incompatible quantization metadata" in result.stderr
