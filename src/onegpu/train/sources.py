"""Instruction data: the 2023 entries' sources and local JSONL, as conversations, mixed by weight.

Each Hub source is a `datasets` call plus a pure formatter from rows in that dataset's own schema
to `Conversation`s, so the formatting is tested on hand-written rows while the download only runs
for users who can reach the Hub:

| name            | Hub dataset                     | one conversation                         |
| --------------- | ------------------------------- | ---------------------------------------- |
| `oasst1`        | OpenAssistant/oasst1            | a tree's top-ranked path (rank 0 first)  |
| `lima`          | GAIR/lima (gated: accept terms) | one of 1,030 (mostly single-turn)        |
| `arc-challenge` | allenai/ai2_arc, ARC-Challenge  | a multiple-choice question -> its letter |
| `arc-easy`      | allenai/ai2_arc, ARC-Easy       | idem                                     |
| `dolly`         | databricks/databricks-dolly-15k | instruction (+ context) -> response      |
| `platypus`      | garage-bAInd/Open-Platypus      | instruction (+ input) -> output          |

A local `.jsonl` file holds one object per line: `{"prompt": ..., "response": ...}` or
`{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegpu.errors import UserError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Multiple-choice answers are letters, as in HELM's MMLU prompts ("Answer: B").
LETTERS = "ABCDEFGHIJ"


class DataError(UserError, ValueError):
    """A data source is unknown, unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """One training example: messages in order; every assistant message is trained on."""

    messages: tuple[Message, ...]
    source: str = ""


def conversation(
    turns: Sequence[tuple[str, str]], source: str = "", system: str | None = None
) -> Conversation | None:
    """A Conversation from (role, text) pairs, or None when it has no assistant reply to learn.

    Trailing user turns (a question nobody answered) are dropped; empty texts are skipped.
    """
    messages = [Message("system", system)] if system else []
    messages += [Message(role, text) for role, text in turns if text and text.strip()]
    while messages and messages[-1].role != "assistant":
        messages.pop()
    if not any(m.role == "assistant" for m in messages):
        return None
    return Conversation(tuple(messages), source)


# -- formatters: rows in each source's real schema -> conversations ------------------------------


def oasst_conversations(
    rows: Iterable[dict[str, Any]], *, lang: str | None = "en", source: str = "oasst1"
) -> Iterator[Conversation]:
    """OpenAssistant oasst1 message rows -> the top-ranked path of each conversation tree.

    Rows are flat messages (`message_id`, `parent_id`, `role` "prompter"/"assistant", `text`,
    `rank`, `lang`, `deleted`, `review_result`, ...). From each root prompt, follow the reply with
    the lowest `rank` (0 is the crowd's favourite; unranked replies come after ranked ones, in
    dataset order) down to a leaf. Deleted and review-rejected messages are left out, and so is
    everything under them. `lang` keeps only trees whose root is in that language (None: all).
    """
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    roots: list[dict[str, Any]] = []
    for row in rows:
        if row.get("deleted") or row.get("review_result") is False:
            continue
        if row.get("parent_id") is None:
            roots.append(row)
        else:
            children[row["parent_id"]].append(row)

    def rank_key(row: dict[str, Any]) -> tuple[bool, float]:
        rank = row.get("rank")
        return (rank is None, 0.0 if rank is None else float(rank))

    roles = {"prompter": "user", "assistant": "assistant"}
    for root in roots:
        if root.get("role") != "prompter" or (lang is not None and root.get("lang") != lang):
            continue
        path = [root]
        while replies := children.get(path[-1]["message_id"]):
            path.append(min(replies, key=rank_key))  # min() keeps the first of equal ranks
        turns = [(roles[m["role"]], m["text"]) for m in path if m.get("role") in roles]
        if conv := conversation(turns, source):
            yield conv


def lima_conversations(
    rows: Iterable[dict[str, Any]], *, source: str = "lima"
) -> Iterator[Conversation]:
    """LIMA rows (`conversations`: alternating user/assistant strings, `source`)."""
    for row in rows:
        texts = row["conversations"]
        turns = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
        if conv := conversation(turns, source):
            yield conv


def arc_conversations(
    rows: Iterable[dict[str, Any]], *, source: str = "arc"
) -> Iterator[Conversation]:
    """AI2 ARC rows (`question`, `choices` {`text`, `label`}, `answerKey`) -> "A. ..." -> "C".

    Some rows label their choices "1".."4"; they are relabelled A..D so every answer is a letter.
    Rows whose answer key is not among their labels are skipped.
    """
    for row in rows:
        labels = list(row["choices"]["label"])
        texts = list(row["choices"]["text"])
        if row["answerKey"] not in labels or len(labels) > len(LETTERS):
            continue
        letters = LETTERS[: len(labels)]
        options = "\n".join(
            f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True)
        )
        answer = letters[labels.index(row["answerKey"])]
        if conv := conversation(
            [("user", f"{row['question']}\n{options}"), ("assistant", answer)], source
        ):
            yield conv


def _with_context(instruction: str, context: str | None) -> str:
    # Instruction first: Dolly's and Platypus's instructions refer to "the text below".
    context = (context or "").strip()
    return f"{instruction.strip()}\n\n{context}" if context else instruction.strip()


def dolly_conversations(
    rows: Iterable[dict[str, Any]], *, source: str = "dolly"
) -> Iterator[Conversation]:
    """Dolly-15k rows (`instruction`, `context`, `response`, `category`)."""
    for row in rows:
        prompt = _with_context(row["instruction"], row.get("context"))
        if conv := conversation([("user", prompt), ("assistant", row["response"])], source):
            yield conv


def platypus_conversations(
    rows: Iterable[dict[str, Any]], *, source: str = "platypus"
) -> Iterator[Conversation]:
    """Open-Platypus rows (`instruction`, `input`, `output`, `data_source`)."""
    for row in rows:
        prompt = _with_context(row["instruction"], row.get("input"))
        if conv := conversation([("user", prompt), ("assistant", row["output"])], source):
            yield conv


def jsonl_conversation(obj: Any, *, source: str = "") -> Conversation | None:
    """One local JSONL object: {"prompt", "response"} or {"messages": [{"role", "content"}]}."""
    if not isinstance(obj, dict):
        raise DataError("expected a JSON object")
    if "messages" in obj:
        turns = []
        for m in obj["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"each message needs a role in {ROLES} and a content; got {m!r}")
            if not isinstance(m.get("content"), str):
                raise DataError(f"message content must be a string; got {m!r}")
            turns.append((m["role"], m["content"]))
        return conversation(turns, source)
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return conversation([("user", obj["prompt"]), ("assistant", obj["response"])], source)
    raise DataError('expected {"prompt": str, "response": str} or {"messages": [...]}')


def read_jsonl(path: Path, *, source: str | None = None) -> list[Conversation]:
    """Conversations of a local JSONL file (blank lines skipped, rows without a reply dropped)."""
    path = Path(path)
    source = str(path) if source is None else source
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = jsonl_conversation(json.loads(line), source=source)
            except (json.JSONDecodeError, DataError) as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from exc
            if conv is not None:
                out.append(conv)
    return out


# -- Hub sources --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HubSource:
    """Where a Hub dataset lives and how its rows become conversations."""

    path: str
    formatter: Callable[..., Iterator[Conversation]]
    config: str | None = None
    split: str = "train"
    data_files: str | None = None  # read these files directly (datasets without parquet files)

    def describe(self) -> dict[str, Any]:
        return {"hub": self.path, "config": self.config, "split": self.split}


SOURCES: dict[str, HubSource] = {
    "oasst1": HubSource("OpenAssistant/oasst1", oasst_conversations),
    # LIMA is gated and ships a loading script, which `datasets` no longer runs: read its JSONL.
    "lima": HubSource(
        "GAIR/lima", lima_conversations, data_files="hf://datasets/GAIR/lima/train.jsonl"
    ),
    "arc-challenge": HubSource("allenai/ai2_arc", arc_conversations, config="ARC-Challenge"),
    "arc-easy": HubSource("allenai/ai2_arc", arc_conversations, config="ARC-Easy"),
    "dolly": HubSource("databricks/databricks-dolly-15k", dolly_conversations),
    "platypus": HubSource("garage-bAInd/Open-Platypus", platypus_conversations),
}


def load_hub_source(name: str) -> list[Conversation]:
    """Download (or read from the Hugging Face cache) one Hub source and format it."""
    spec = SOURCES[name]
    from datasets import load_dataset  # the Hub path only: local files need no `datasets`

    log.info("loading %s (%s) through datasets", name, spec.path)
    if spec.data_files is not None:
        rows = load_dataset("json", data_files=spec.data_files, split="train")
    else:
        rows = load_dataset(spec.path, spec.config, split=spec.split)
    return list(spec.formatter(rows, source=name))


# -- mixing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A source name (a key of SOURCES or a .jsonl path) and its weight in the mixture."""

    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        """`NAME` or `NAME:WEIGHT`, e.g. `dolly:0.5`, `data/mine.jsonl:2`."""
        name, sep, weight = text.rpartition(":")
        if sep and name:
            try:
                value = float(weight)
            except ValueError:
                return cls(text)  # a path with a colon in it
            if not math.isfinite(value) or value < 0:
                raise DataError(f"weight of {name!r} must be a finite number >= 0; got {weight}")
            return cls(name, value)
        return cls(text)


@dataclass
class SourceCounts:
    """What one source contributed, for the run record."""

    name: str
    weight: float
    available: int
    train: int
    eval: int
    detail: dict[str, Any] = field(default_factory=dict)


def load_source(spec: SourceSpec) -> tuple[list[Conversation], dict[str, Any]]:
    """The conversations of one source and a description of where they came from."""
    if spec.name in SOURCES:
        conversations, where = load_hub_source(spec.name), SOURCES[spec.name].describe()
    elif (path := Path(spec.name)).suffix == ".jsonl" or path.exists():
        conversations, where = read_jsonl(path, source=spec.name), {"file": str(path)}
    else:
        raise DataError(
            f"unknown data source {spec.name!r}: use one of {', '.join(SOURCES)} or a .jsonl file"
        )
    if not conversations:
        raise DataError(f"data source {spec.name!r} holds no example with a reply to learn")
    return conversations, where


def weighted_sample(items: Sequence[Any], weight: float, rng: random.Random) -> list[Any]:
    """`weight` times the items: whole copies, then a random part for the fraction (0.5 = half)."""
    whole, fraction = divmod(weight, 1.0)
    out = list(items) * int(whole)
    out += rng.sample(list(items), round(fraction * len(items)))
    return out


def mix(
    sources: Sequence[tuple[SourceSpec, Sequence[Conversation]]],
    *,
    eval_fraction: float,
    max_eval: int | None,
    seed: int,
) -> tuple[list[Conversation], list[Conversation], list[SourceCounts]]:
    """Split each source into train and held-out eval, weight the train parts, shuffle the mixture.

    The eval part is cut before weighting, so an up-weighted example never appears in both. Each
    source gives `eval_fraction` of its examples to eval (at least one when the fraction is > 0 and
    the source has two or more); `max_eval` caps the whole eval set, keeping sources' shares.
    """
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    rng = random.Random(seed)
    total = sum(len(items) for _, items in sources)
    n_eval_total = round(eval_fraction * total)
    if max_eval is not None:
        n_eval_total = min(n_eval_total, max_eval)
    train: list[Conversation] = []
    held: list[Conversation] = []
    counts = []
    for spec, items in sources:
        order = list(items)
        rng.shuffle(order)
        n_eval = round(n_eval_total * len(order) / total) if total else 0
        if eval_fraction > 0 and n_eval == 0 and len(order) >= 2 and max_eval != 0:
            n_eval = 1
        n_eval = min(n_eval, max(len(order) - 1, 0))
        held += order[:n_eval]
        part = weighted_sample(order[n_eval:], spec.weight, rng)
        train += part
        counts.append(SourceCounts(spec.name, spec.weight, len(order), len(part), n_eval))
    rng.shuffle(train)
    return train, held, counts
