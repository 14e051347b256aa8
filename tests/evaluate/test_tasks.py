"""HELM's prompt assembly, example choice and scoring, rebuilt (onegpu.evaluate.tasks)."""

from __future__ import annotations

import pytest

from onegpu.evaluate import tasks


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 18.", "18"),  # the period is not part of it
        ("so 1,200 apples. The answer is 1,200.", "1200"),  # commas dropped, the last one
        ("-3 degrees then 7", "7"),
        ("It fell by -4.5", "-4.5"),
        ("no digits here", None),
    ],
)
def test_final_number_reads_the_last_number_as_helm_does(text, number):
    assert tasks.final_number(text) == number


def test_helm_examples_spread_over_the_answers_in_its_seeded_order():
    # Five distinct answers: HELM's seed-0 order of the sorted labels is 2, 1, 0, 4, 3.
    pool = ["L3", "L1", "L4", "L0", "L2"]
    assert tasks.helm_examples(pool, lambda x: x, 5) == ["L2", "L1", "L0", "L4", "L3"]
    # Many items per answer: the examples take turns over the answers.
    pool = [("yes", i) for i in range(10)] + [("no", i) for i in range(3)]
    chosen = tasks.helm_examples(pool, lambda x: x[0], 5)
    assert [label for label, _ in chosen] == ["yes", "no", "yes", "no", "yes"]
    assert len(set(chosen)) == 5
    assert tasks.helm_examples(pool, lambda x: x[0], 5) == chosen  # seeded
    assert len(tasks.helm_examples(pool[:2], lambda x: x[0], 5)) == 2  # at most the pool


def test_blocks_are_separated_by_one_blank_line_and_end_at_the_prefix():
    examples = ["Q: 1+1\nA: 2\n", "Q: 2+2\nA: 4\n"]
    prompt = tasks.assemble([*examples, "Q: 3+3\nA:"], "Add.")
    assert prompt == "Add.\n\nQ: 1+1\nA: 2\n\nQ: 2+2\nA: 4\n\nQ: 3+3\nA:"


def test_fitting_drops_examples_from_the_end_until_the_answer_fits():
    def build(shots: int) -> str:
        return "x" * (100 * shots) + "question"

    assert tasks.fit(build, 5, 400, len, 2048) == build(5)  # fits as is
    assert tasks.fit(build, 5, 1500, len, 2048) == build(5)
    assert tasks.fit(build, 5, 1700, len, 2048) == build(3)  # 300 + 8 + 1700 <= 2048
    assert tasks.fit(build, 5, 2100, len, 2048) == build(0)
    assert tasks.fit(build, 5, 2100, None, 2048) == build(5)  # nothing to count with


@pytest.mark.parametrize(
    ("scenario", "gold", "text", "right"),
    [
        ("mmlu", "B", " B", True),
        ("mmlu", "B", "B.", False),  # HELM maps only the bare letter
        ("mmlu", "B", " C", False),
        ("boolq", "Yes", " Yes", True),
        ("boolq", "Yes", " yes", False),
        ("gsm8k", "18", " She makes 9 * 2 = $18. The answer is 18.", True),
        ("gsm8k", "1200", "The answer is 1,200.", True),
        ("gsm8k", "18", "The answer is 16.", False),
    ],
)
def test_items_are_scored_by_the_scenarios_main_metric(scenario, gold, text, right):
    item = tasks.Item(scenario=scenario, key="k", prompt="p", gold=gold, max_new_tokens=1)
    assert item.correct(text) is right


def test_a_request_carries_every_key_helm_sends():
    item = tasks.Item("gsm8k", "k", "Q: q\nA:", "1", 400, ("\n\n",))
    assert item.request() == {
        "prompt": "Q: q\nA:",
        "temperature": 1e-7,
        "num_return_sequences": 1,
        "max_new_tokens": 400,
        "top_p": 1,
        "echo_prompt": False,
        "top_k_per_token": 1,
        "stop_sequences": ["\n\n"],
    }
