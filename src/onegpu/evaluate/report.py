"""Served answers against reference answers, per scenario: accuracy both ways, agreement, speed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from onegpu.evaluate.reference import Answer
from onegpu.evaluate.tasks import Item


@dataclass(frozen=True)
class Row:
    """One scenario of one run."""

    scenario: str
    items: int
    failed: int  # requests answered with an error
    accuracy: float  # served, over all items (a failure scores 0)
    reference_accuracy: float | None
    agreement: float | None  # share of items whose text equals the reference's
    answer_agreement: float | None  # share whose scored answer equals the reference's
    max_logprob_gap: float | None  # largest |served - reference| first-token logprob
    seconds: float
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _answer_of(item: Item, text: str) -> str:
    from onegpu.evaluate.tasks import final_number

    return str(final_number(text)) if item.scenario == "gsm8k" else text.strip()


def compare(
    items: Sequence[Item],
    served: Mapping[str, Answer | str],
    reference: Mapping[str, Answer] | None,
    seconds: Mapping[str, float],
) -> list[Row]:
    """One Row per scenario (in order of first appearance); `seconds` is each one's wall time."""
    rows = []
    for scenario in dict.fromkeys(item.scenario for item in items):
        group = [item for item in items if item.scenario == scenario]
        answers = [served.get(item.key, "missing") for item in group]
        ok = [(item, a) for item, a in zip(group, answers, strict=True) if isinstance(a, Answer)]
        accuracy = sum(item.correct(a.text) for item, a in ok) / len(group)
        ref_accuracy = agreement = answer_agreement = gap = None
        if reference is not None:
            ref_accuracy = sum(item.correct(reference[item.key].text) for item in group) / len(
                group
            )
            pairs = [(item, a, reference[item.key]) for item, a in ok]
            agreement = sum(a.text == r.text for _, a, r in pairs) / len(group)
            answer_agreement = sum(
                _answer_of(item, a.text) == _answer_of(item, r.text) for item, a, r in pairs
            ) / len(group)
            gaps = [
                abs(a.token_logprobs[0] - r.token_logprobs[0])
                for _, a, r in pairs
                if a.token_logprobs and r.token_logprobs
            ]
            gap = max(gaps, default=math.nan)
        rows.append(
            Row(
                scenario=scenario,
                items=len(group),
                failed=len(group) - len(ok),
                accuracy=accuracy,
                reference_accuracy=ref_accuracy,
                agreement=agreement,
                answer_agreement=answer_agreement,
                max_logprob_gap=gap,
                seconds=seconds.get(scenario, 0.0),
                new_tokens=sum(a.new_tokens for _, a in ok),
            )
        )
    return rows


def differences(first: Mapping[str, Answer | str], second: Mapping[str, Answer | str]) -> list[str]:
    """Keys whose answers are not bit-identical (text and every token's logprob) in both runs."""
    out = []
    for key, a in first.items():
        b = second.get(key)
        same = (
            isinstance(a, Answer)
            and isinstance(b, Answer)
            and a.text == b.text
            and a.token_logprobs == b.token_logprobs
        )
        if not same:
            out.append(key)
    return out


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def markdown(rows_by_run: Mapping[str, Sequence[Row]]) -> str:
    """One table: a line per (run, scenario)."""
    lines = [
        "| run | scenario | items | failed | accuracy | reference | agree (text) | agree "
        "(answer) | max first-token logprob gap | seconds | new tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, rows in rows_by_run.items():
        for r in rows:
            gap = "" if r.max_logprob_gap is None else f"{r.max_logprob_gap:.2e}"
            lines.append(
                f"| {run} | {r.scenario} | {r.items} | {r.failed} | {_pct(r.accuracy)} | "
                f"{_pct(r.reference_accuracy)} | {_pct(r.agreement)} | "
                f"{_pct(r.answer_agreement)} | {gap} | {r.seconds:.1f} | {r.tokens_per_s:.1f} |"
            )
    return "\n".join(lines)
