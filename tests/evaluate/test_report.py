"""Served answers against reference answers: accuracy, agreement, bit-identity."""

from __future__ import annotations

import pytest

from onegpu.evaluate.reference import Answer, cut
from onegpu.evaluate.report import compare, differences, markdown
from onegpu.evaluate.tasks import Item

ITEMS = [
    Item("mmlu", "m1", "p", "A", 1),
    Item("mmlu", "m2", "p", "B", 1),
    Item("gsm8k", "g1", "p", "18", 400),
    Item("gsm8k", "g2", "p", "5", 400),
]


def answer(key: str, text: str, logprobs=(-0.5,)) -> Answer:
    return Answer(key, text, sum(logprobs), len(logprobs), 1.0, list(logprobs))


@pytest.mark.parametrize(
    ("text", "stops", "kept"),
    [
        ("Yes\n\nQ: next", ("\n\n",), "Yes"),
        ("Yes\nNo", ("\n\n", "\n"), "Yes"),  # the earliest stop
        ("no stop here", ("###",), "no stop here"),
        ("anything", (), "anything"),
    ],
)
def test_cut_keeps_the_text_before_the_first_stop(text, stops, kept):
    assert cut(text, stops) == kept


def test_compare_counts_accuracy_agreement_and_failures_per_scenario():
    reference = {
        "m1": answer("m1", " A", (-0.1,)),
        "m2": answer("m2", " C", (-0.2,)),
        "g1": answer("g1", "The answer is 18.", (-1.0, -2.0)),
        "g2": answer("g2", "It is 4. The answer is 4.", (-1.0,)),
    }
    served = {
        "m1": answer("m1", " A", (-0.1001,)),
        "m2": "/process: HTTP 503",  # a failure scores 0 and agrees with nothing
        "g1": answer("g1", "The answer is 18.", (-1.0, -2.0)),
        "g2": answer("g2", "So 4. The answer is 4.", (-1.0,)),  # other words, same answer
    }
    rows = {r.scenario: r for r in compare(ITEMS, served, reference, {"mmlu": 2.0})}
    mmlu, gsm = rows["mmlu"], rows["gsm8k"]
    assert (mmlu.items, mmlu.failed, mmlu.accuracy, mmlu.reference_accuracy) == (2, 1, 0.5, 0.5)
    assert mmlu.agreement == 0.5 and mmlu.max_logprob_gap == pytest.approx(1e-4)
    assert mmlu.seconds == 2.0 and mmlu.new_tokens == 1
    assert (gsm.accuracy, gsm.reference_accuracy) == (0.5, 0.5)
    assert (gsm.agreement, gsm.answer_agreement) == (0.5, 1.0)
    table = markdown({"default": list(rows.values())})
    assert "| default | mmlu | 2 | 1 | 50.0% | 50.0% | 50.0% |" in table


def test_differences_are_answers_not_bit_identical():
    first = {"a": answer("a", " A", (-0.1,)), "b": answer("b", " B"), "c": "HTTP 500"}
    second = {"a": answer("a", " A", (-0.10000001,)), "b": answer("b", " B"), "c": "HTTP 500"}
    assert differences(first, second) == ["a", "c"]
