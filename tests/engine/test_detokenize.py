import pytest

from onegpu.engine.detokenize import REPLACEMENT, IncrementalDetokenizer, token_pieces

# Each of these has characters that the Qwen BPE splits over several tokens (checked below).
SPLIT = ["🦜🦩 birds", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "龘靐齉", "🧑\u200d🚀 astronaut", "🫠"]
WHOLE = ["naïve café", "The capital of France is Paris.", "日本語のテキスト", " B.\n\nQuestion:"]


@pytest.fixture
def decode(qwen_tokenizer):
    return lambda ids: qwen_tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", SPLIT)
def test_the_table_really_splits_characters(qwen_tokenizer, decode, text):
    ids = qwen_tokenizer.encode(text)
    assert any(REPLACEMENT in decode([i]) for i in ids)


@pytest.mark.parametrize("text", SPLIT + WHOLE)
def test_pieces_concatenate_to_the_text_and_are_valid(qwen_tokenizer, decode, text):
    ids = qwen_tokenizer.encode(text)
    pieces = token_pieces(decode, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)


def test_bytes_are_held_back_until_the_character_completes(qwen_tokenizer, decode):
    ids = qwen_tokenizer.encode("🫠")
    assert len(ids) == 3
    assert token_pieces(decode, ids) == ["", "", "🫠"]


def test_context_gives_the_first_piece_its_leading_space(qwen_tokenizer, decode):
    prompt = qwen_tokenizer.encode("Answer:")
    answer = qwen_tokenizer.encode(" C")
    detok = IncrementalDetokenizer(decode, context_ids=prompt)
    assert detok.push(answer[0]) == " C"


def test_an_incomplete_character_at_the_end_flushes_without_crashing(qwen_tokenizer, decode):
    ids = qwen_tokenizer.encode("ok 🫠")[:-1]  # cut inside the emoji
    pieces = token_pieces(decode, ids)
    assert "".join(pieces).startswith("ok")
    assert pieces[-1].endswith(REPLACEMENT)


def test_long_streams_keep_matching_full_decode(qwen_tokenizer, decode):
    text = "🦜 words and 龘 more, " * 40
    ids = qwen_tokenizer.encode(text)
    assert "".join(token_pieces(decode, ids)) == text
