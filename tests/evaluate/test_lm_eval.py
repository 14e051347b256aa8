"""lm-evaluation-harness as the judge: its `local-completions` model against `onegpu serve` gives
what its `hf` model gives on the same weights (the real Qwen2.5-Coder-0.5B), by loglikelihood
(echo + logprobs) and by generation, on local tasks made from real data.

A slice: 20 MMLU items, 10 HellaSwag, 10 NQ-open. `bench/lm_eval_compare.py` runs 200 of each.
Skipped, with the reason, only when the package index cannot be reached.
"""

from __future__ import annotations

import os

import pytest

from onegpu.evaluate.harness import write_tasks
from tests.live import live_server

pytestmark = [pytest.mark.slow, pytest.mark.real]

for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(name, "1")


def answers(result: dict, task: str) -> list:
    """Per document: the log-likelihoods (multiple choice) or the generated text."""
    out = []
    for sample in result["samples"][task]:
        responses = sample["resps"]
        if isinstance(responses[0][0], str):
            out.append(responses[0][0])
        else:
            out.append([float(r[0][0]) for r in responses])
    return out


def test_local_completions_against_onegpu_equals_hf_on_the_same_weights(real, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (make test installs it)")
    from lm_eval.tasks import TaskManager

    from onegpu.engine.loading import EngineConfig, load_engine
    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings

    folder, data = real
    subjects = ["miscellaneous", "philosophy"]
    tasks = write_tasks(data, tmp_path, subjects=subjects, per_subject=10, hellaswag=10, nq=10)
    common = {"tasks": tasks, "task_manager": TaskManager(include_path=str(tmp_path))}
    common["log_samples"] = True
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},device=cpu,dtype=float32,batch_size=4",
        **common,
    )
    engine = load_engine(EngineConfig(model=str(folder), device="cpu"))
    with live_server(create_app(ServeSettings(), engine=engine)) as url:
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": "qwen", "base_url": f"{url}/v1/completions", "tokenizer": str(folder),
                "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 1,
                "batch_size": 4,
            },
            **common,
        )  # fmt: skip
    for task in ("onegpu_mmlu", "onegpu_hellaswag"):
        ours, theirs = answers(served, task), answers(hf, task)
        gaps = [
            abs(a - b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True)
        ]
        assert max(gaps) < 1e-3, (task, max(gaps))  # float32 both: rounding, not another answer
        assert served["results"][task]["acc,none"] == hf["results"][task]["acc,none"]
    ours, theirs = answers(served, "onegpu_nq"), answers(hf, "onegpu_nq")
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= 9  # of 10 generations
    gap = (
        served["results"]["onegpu_nq"]["exact_match,none"]
        - hf["results"]["onegpu_nq"]["exact_match,none"]
    )
    assert abs(gap) <= 0.1
