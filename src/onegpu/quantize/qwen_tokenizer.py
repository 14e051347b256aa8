"""Qwen v1's tiktoken vocabulary (`qwen.tiktoken`) as a native fast tokenizer.

Qwen-14B (v1) ships its tokenizer as remote code around `tiktoken`. The same byte-level BPE fits
the `tokenizers` library exactly: the vocabulary is the ranks file mapped through GPT-2's
byte-to-unicode table, the merges are derived from the ranks, and the pre-tokenizer is Qwen's
regex. The result loads with `AutoTokenizer.from_pretrained(dst)` and gives v1's ids, special
tokens included, without `trust_remote_code`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Qwen v1's pre-tokenizer (tokenization_qwen.py): GPT-4's pattern with single digits.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
TIKTOKEN_FILE = "qwen.tiktoken"


class QwenTokenizerConversionError(ValueError):
    """The file is not a Qwen v1 (tiktoken) vocabulary, or it cannot be expressed as BPE merges."""


def special_tokens(n_ranks: int) -> dict[str, int]:
    """Qwen v1's special tokens and their ids: they follow the BPE ranks, in this order.

    For the real vocabulary (151,643 ranks): `<|endoftext|>`=151643, `<|im_start|>`=151644,
    `<|im_end|>`=151645, then `<|extra_0|>`..`<|extra_204|>`.
    """
    names = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS)
    return {name: n_ranks + i for i, name in enumerate(names)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file (`base64-token rank` per line) into `{token bytes: rank}`."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as error:
            raise QwenTokenizerConversionError(
                f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r}"
            ) from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise QwenTokenizerConversionError(f"{path}: ranks are not unique and contiguous from 0")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise QwenTokenizerConversionError(
            f"{path}: {len(missing)} single bytes have no rank, so some text cannot be encoded"
        )
    return ranks


def _merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that BPE joins last to form `token`: run tiktoken's merge rule on the token's
    own bytes, using only merges ranked below it."""
    rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_index = rank, -1
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
            if pair_rank < best_rank:
                best_rank, best_index = pair_rank, i
        if best_index < 0:
            raise QwenTokenizerConversionError(
                f"token {token!r} (rank {rank}) cannot be reached by merging lower-ranked tokens"
            )
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts[0], parts[1]


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: merge priority equals the merged token's rank,
    which is tiktoken's rule (join the adjacent pair whose result has the lowest rank)."""
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    return [
        _merge_parts(token, ranks)
        for _, token in tqdm(by_rank, desc="BPE merges", unit="tok", mininterval=1.0)
    ]


def build_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """A `tokenizers` byte-level BPE with Qwen v1's ids, pre-tokenizer and special tokens."""
    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in bpe_merges(ranks)]
    # ignore_merges: a pre-token that is itself in the vocabulary is taken whole, as tiktoken does.
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    # v1's QWenTokenizer.tokenize() NFC-normalizes text before tiktoken sees it.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # v1 encodes with allowed_special="all": special-token text in the input becomes its id.
    specials = special_tokens(len(ranks))
    tokenizer.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in specials]
    )
    wrong = {name: i for name, i in specials.items() if tokenizer.token_to_id(name) != i}
    if wrong:
        raise QwenTokenizerConversionError(f"special tokens got unexpected ids: {wrong}")
    return tokenizer


def _tokenizer_config(*, model_max_length: int | None = None) -> dict:
    """`tokenizer_config.json` for the converted tokenizer: load `tokenizer.json` as is (no
    model-specific class rebuilds it), eos `<|endoftext|>`, no bos, pad or unk token, and no
    clean-up of spaces on decode (so decoding gives back the exact bytes)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": ENDOFTEXT,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def convert_qwen_tokenizer(
    tiktoken_file: str | Path, dst: Path, *, model_max_length: int | None = None
) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` for a Qwen v1 `qwen.tiktoken` into `dst`.

    The result loads with `transformers.AutoTokenizer.from_pretrained(dst)` (no remote code) and
    encodes like v1: same ids, special tokens included, `<|endoftext|>` as eos, no bos or pad.
    `model_max_length` is the model's context window (v1's `seq_length`), if known.
    """
    ranks = load_tiktoken_ranks(tiktoken_file)
    logger.info("converting %s: %d BPE ranks", tiktoken_file, len(ranks))
    tokenizer = build_tokenizer(ranks)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    config = _tokenizer_config(model_max_length=model_max_length)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
