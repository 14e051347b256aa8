"""GGUF files as models: each is converted once to a plain Hugging Face folder, cached by the
file's content hash, which `serve` and `quantize` then load like any other folder.

transformers dequantizes a GGUF (Q4_K, Q8_0, ...) on load; the weights are saved in float32,
where every dequantized value is exact. Only the Llama and Qwen2 layouts are accepted (the
engine's fused layers and the quantizer know them); anything else, and a file that is missing,
not GGUF, or cut short, is a one-line `GGUFError` before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from onegpu.errors import UserError
from onegpu.files import cache_root, readable_by_all, staged

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2")
MAGIC = b"GGUF"
# The converted folder's record of where it came from.
SOURCE_FILE = "onegpu-gguf.json"
_CHUNK = 16 * 2**20
# What the tokenizer's process runs: argv is the GGUF file and the folder to save into.
_TOKENIZER_CHILD = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
path, out = Path(sys.argv[1]), sys.argv[2]
AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
"""


class GGUFError(UserError):
    """A GGUF file that cannot be served: missing, corrupt, truncated or of another layout."""


def is_gguf(model: str | Path | None) -> bool:
    """Whether `model` names a GGUF file (by its suffix; the content is checked on conversion)."""
    return model is not None and str(model).lower().endswith(".gguf")


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes (a progress bar for large files)."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}", disable=size < 2**30
        ) as bar,
    ):
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_header(path: Path) -> None:
    """Refuse a path that is not a file starting with GGUF's magic bytes (cheap: 4 bytes read)."""
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")


def converted(path: str | Path) -> Path:
    """The Hugging Face folder for GGUF file `path`, converted on first use (about a minute for
    a 0.5B model on two cores) into `<cache>/gguf/<name>-<hash>`, then reused."""
    path = Path(path).expanduser().resolve()
    check_header(path)
    digest = sha256_of(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    log.warning("converting %s to %s (once)", path.name, target)
    with staged(target) as partial:
        architecture = _convert(path, partial)
        readable_by_all(partial)
        record = {"file": path.name, "sha256": digest, "architecture": architecture}
        (partial / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def _convert(path: Path, out: Path) -> str:
    """Write the folder for `path` into `out`; its architecture. transformers reads a GGUF's
    metadata on every call, so the config is read once and handed to the model's loading."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the GGUF reader fails in many ways on a damaged file
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise GGUFError(f"{path} is corrupt, truncated or unreadable ({reason})") from None
    if config.model_type not in SUPPORTED:
        raise GGUFError(
            f"{path} holds a {config.model_type} model; GGUF input supports "
            f"{', '.join(SUPPORTED)} (convert other models to a Hugging Face folder)"
        )
    # The tokenizer is rebuilt by a second process meanwhile: both spend their time in Python.
    child = subprocess.Popen(
        [sys.executable, "-c", _TOKENIZER_CHILD, str(path), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        )
    except Exception as exc:
        child.kill()
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise GGUFError(f"{path} is corrupt, truncated or unreadable ({reason})") from None
    finally:
        _, errors = child.communicate()
    if child.returncode != 0:
        last = (errors.strip().splitlines() or ["no output"])[-1]
        raise GGUFError(f"cannot read the tokenizer of {path}: {last}")
    # transformers refuses to save a model it loaded from GGUF; the same weights in a plain
    # model (built without memory, then handed the loaded tensors) save normally.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    return config.model_type
