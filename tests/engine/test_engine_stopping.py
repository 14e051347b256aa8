"""Stops, trims and default cuts through the whole engine, on a model that follows a script."""

import pytest

from onegpu.engine.types import GenerationRequest


def run(engine, max_new_tokens=64, stop=(), prompt="Question: which?\nAnswer:"):
    request = GenerationRequest(
        prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0, stop_sequences=tuple(stop)
    )
    return engine.generate(request)


def texts(completion):
    return [t.text for t in completion.tokens]


def test_stop_inside_a_merged_token_is_trimmed_from_text_and_tokens(scripted, qwen_tokenizer):
    assert qwen_tokenizer.decode(qwen_tokenizer.encode(" 42.\n\n")[-1:]) == ".\n\n"
    completion = run(scripted(" 42.\n\nQuestion: next"), stop=["\n\n"])
    assert completion.text == " 42."
    assert texts(completion)[-1] == "."
    assert completion.finish_reason == "stop"


def test_stop_spanning_two_tokens(scripted):
    engine = scripted(" answer is", " ##", "#", " more text")
    completion = run(engine, stop=["###"])
    assert completion.text == " answer is "
    assert "".join(texts(completion)) == completion.text
    assert completion.finish_reason == "stop"
    assert completion.logprob == pytest.approx(sum(t.logprob for t in completion.tokens))


def test_generation_stops_at_the_first_stop(scripted):
    completion = run(scripted(" summary ###\n", " never reached ###"), stop=["###"])
    assert completion.text == " summary "
    assert completion.new_tokens <= 4  # it stopped instead of running to max_new_tokens


def test_default_cut_at_the_first_blank_line_when_no_stop_is_given(scripted):
    completion = run(scripted(" B\n\nQuestion: what else?"), stop=[])
    assert completion.text == " B"


def test_default_cut_skips_a_leading_blank_line(scripted):
    completion = run(scripted("\n\n B\n\nQuestion"), stop=[])
    assert completion.text == "\n\n B"


def test_no_default_cut_when_one_token_is_asked_for(scripted):
    completion = run(scripted(".\n\n"), max_new_tokens=1, stop=[])
    assert completion.text == ".\n\n"


def test_default_cut_is_configurable(scripted):
    completion = run(scripted(" B\n\nQuestion"), stop=[], max_new_tokens=4)
    assert completion.text == " B"
    off = run(scripted(" B\n\nQuestion", default_stop=()), stop=[], max_new_tokens=3)
    assert off.text == " B\n\nQuestion"


def test_end_of_text_ends_the_answer_and_is_not_returned(scripted):
    completion = run(scripted(" C", 151643, " ignored"))
    assert completion.text == " C"
    assert completion.finish_reason == "eos"


def test_emoji_split_across_tokens_stays_whole(scripted):
    completion = run(scripted(" 🫠🦜 movie"), stop=[])
    assert completion.text == " 🫠🦜 movie"
    assert "\ufffd" not in completion.text
