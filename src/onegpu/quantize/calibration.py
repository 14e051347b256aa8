"""Calibration data for GPTQ: random token windows of a text corpus.

GPTQ needs a few hundred thousand tokens of ordinary text to estimate each layer's input
statistics. Following the GPTQ paper (and the 2023 entry we build on), the corpus is joined into
one string, tokenized once, and `n_samples` windows of `seq_len` tokens are cut at random offsets
drawn from a seeded generator, so the same arguments always give the same samples.

Sources:
- ``"wikitext2"``: WikiText-2 raw through `datasets` (needs the Hugging Face Hub; ``split`` picks
  train/validation/test, train by default).
- a local ``.txt`` file: its text as is.
- a local ``.jsonl`` file: one ``{"text": ...}`` object per line; rows are joined like WikiText.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegpu.errors import UserError

logger = logging.getLogger(__name__)

WIKITEXT2 = "wikitext2"
# Rows of the raw WikiText splits are paragraphs; the standard evaluation joins them with a
# blank line (the GPTQ paper, the Hugging Face perplexity guide).
ROW_SEPARATOR = "\n\n"


class CalibrationError(UserError, ValueError):
    """The calibration source is missing, malformed or too short for the requested samples."""


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration (or evaluation) text comes from, as recorded in artifact metadata."""

    name: str  # "wikitext2" or a file path
    split: str | None  # dataset split for "wikitext2", None for files

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "split": self.split}


def join_rows(rows: Iterable[str]) -> str:
    """Join dataset rows the way WikiText perplexity does (blank line between rows)."""
    return ROW_SEPARATOR.join(rows)


def read_rows(path: Path) -> list[str]:
    """Rows of a local corpus: the ``text`` field of each JSONL line, or a .txt file's text."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CalibrationError(
                        f'{path}:{lineno}: expected a JSON object with a "text" field'
                    ) from e
        return rows
    return [path.read_text(encoding="utf-8")]


def load_text(source: str | Path, *, split: str = "train") -> tuple[str, CalibrationSource]:
    """Text of ``source`` ("wikitext2" or a local .txt/.jsonl file), rows joined into one string."""
    if str(source) == WIKITEXT2:
        # Real download path for users; offline machines pass a local file instead.
        from datasets import load_dataset

        logger.info("loading wikitext-2-raw-v1 (%s split) through datasets", split)
        dataset = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return join_rows(dataset["text"]), CalibrationSource(WIKITEXT2, split)
    path = Path(source)
    return join_rows(read_rows(path)), CalibrationSource(str(path), None)


def window_starts(n_tokens: int, *, n_samples: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of ``n_samples`` windows of ``seq_len`` tokens inside ``n_tokens``.

    Offsets are uniform in ``[0, n_tokens - seq_len]`` and drawn from ``random.Random(seed)``:
    pure and deterministic, independent of global random state.
    """
    if n_samples < 1:
        raise CalibrationError(f"n_samples must be at least 1, got {n_samples}")
    if seq_len < 1:
        raise CalibrationError(f"seq_len must be at least 1, got {seq_len}")
    if n_tokens < seq_len:
        raise CalibrationError(
            f"calibration text has {n_tokens} tokens, fewer than seq_len={seq_len}: "
            "use a larger corpus or a shorter sequence length"
        )
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seq_len) for _ in range(n_samples)]


def sample_windows(
    token_ids: Sequence[int], *, n_samples: int, seq_len: int, seed: int
) -> list[list[int]]:
    """``n_samples`` random windows of exactly ``seq_len`` tokens from ``token_ids``."""
    starts = window_starts(len(token_ids), n_samples=n_samples, seq_len=seq_len, seed=seed)
    return [list(token_ids[s : s + seq_len]) for s in starts]


def calibration_samples(
    tokenizer: Any, text: str, *, n_samples: int = 120, seq_len: int = 2048, seed: int = 0
) -> list[dict[str, list[int]]]:
    """Tokenize ``text`` once and cut GPTQ calibration samples from it.

    Returns ``[{"input_ids": [seq_len ints], "attention_mask": [seq_len ones]}, ...]``, the
    format GPTQModel's ``quantize`` accepts. No special tokens are added: windows start
    mid-text anyway.
    """
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logger.info(
        "calibration: %d tokens of text, %d windows of %d tokens (seed %d)",
        len(token_ids),
        n_samples,
        seq_len,
        seed,
    )
    windows = sample_windows(token_ids, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
