"""Per-source formatters on hand-written rows in each dataset's real schema; JSONL; mixing."""

import json
import random

import pytest

from onegpu.train.sources import (
    Conversation,
    DataError,
    Message,
    SourceSpec,
    arc_conversations,
    dolly_conversations,
    jsonl_conversation,
    lima_conversations,
    mix,
    oasst_conversations,
    platypus_conversations,
    read_jsonl,
    weighted_sample,
)


def turns(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


def oasst_row(mid, parent, role, text, rank=None, lang="en", **extra):
    # The oasst1 message table's columns (the ones the formatter reads, and a few it ignores).
    return {
        "message_id": mid,
        "parent_id": parent,
        "user_id": "u",
        "created_date": "2023-02-05T14:23:50.983374+00:00",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": extra.get("review_result", True),
        "deleted": extra.get("deleted", False),
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "message_tree_id": "t",
        "tree_state": "ready_for_export",
    }


OASST_ROWS = [
    oasst_row("p1", None, "prompter", "How do magnets work?"),
    oasst_row("a1", "p1", "assistant", "Second-best answer.", rank=1.0),
    oasst_row("a2", "p1", "assistant", "Best answer.", rank=0.0),
    oasst_row("a3", "p1", "assistant", "Unranked answer."),
    oasst_row("p2", "a2", "prompter", "Why?", rank=0.0),
    oasst_row("a4", "p2", "assistant", "Because of electrons."),
    oasst_row("p9", "a1", "prompter", "A follow-up to the worse answer."),
    # A second tree in German; and a tree whose only reply was deleted.
    oasst_row("q1", None, "prompter", "Wie spät ist es?", lang="de"),
    oasst_row("b1", "q1", "assistant", "Keine Ahnung.", rank=0.0, lang="de"),
    oasst_row("r1", None, "prompter", "Hello?"),
    oasst_row("c1", "r1", "assistant", "Spam", rank=0.0, deleted=True),
    # A rejected reply loses to an accepted one even with a better rank.
    oasst_row("s1", None, "prompter", "Capital of France?"),
    oasst_row("d1", "s1", "assistant", "Rejected.", rank=0.0, review_result=False),
    oasst_row("d2", "s1", "assistant", "Paris.", rank=1.0),
]


def test_oasst_follows_the_top_ranked_path_of_each_english_tree():
    convs = list(oasst_conversations(OASST_ROWS))
    assert [turns(c) for c in convs] == [
        [
            ("user", "How do magnets work?"),
            ("assistant", "Best answer."),
            ("user", "Why?"),
            ("assistant", "Because of electrons."),
        ],
        [("user", "Capital of France?"), ("assistant", "Paris.")],
    ]
    assert all(c.source == "oasst1" for c in convs)


def test_oasst_language_filter_can_be_lifted():
    convs = list(oasst_conversations(OASST_ROWS, lang=None))
    assert [("user", "Wie spät ist es?"), ("assistant", "Keine Ahnung.")] in map(turns, convs)


def test_oasst_unranked_replies_keep_dataset_order():
    rows = [
        oasst_row("p", None, "prompter", "Q"),
        oasst_row("x", "p", "assistant", "first"),
        oasst_row("y", "p", "assistant", "second"),
    ]
    assert turns(next(oasst_conversations(rows))) == [("user", "Q"), ("assistant", "first")]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"conversations": ["Write a haiku.", "Leaves fall..."], "source": "stackexchange"},
            [("user", "Write a haiku."), ("assistant", "Leaves fall...")],
        ),
        (
            {"conversations": ["Hi", "Hello!", "How are you?", "Fine."], "source": "multi_turn"},
            [
                ("user", "Hi"),
                ("assistant", "Hello!"),
                ("user", "How are you?"),
                ("assistant", "Fine."),
            ],
        ),
        # LIMA's test split: a prompt with no reply gives no example.
        ({"conversations": ["Unanswered prompt"], "source": "test"}, None),
    ],
)
def test_lima(row, expected):
    convs = list(lima_conversations([row]))
    assert [turns(c) for c in convs] == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("row", "prompt", "answer"),
    [
        (
            {
                "id": "Mercury_7175875",
                "question": "Which gas do plants absorb?",
                "choices": {
                    "text": ["Oxygen", "Carbon dioxide", "Helium"],
                    "label": ["A", "B", "C"],
                },
                "answerKey": "B",
            },
            "Which gas do plants absorb?\nA. Oxygen\nB. Carbon dioxide\nC. Helium",
            "B",
        ),
        (  # numeric labels become letters
            {
                "id": "NYSEDREGENTS_2015_4_8",
                "question": "What is 2+2?",
                "choices": {"text": ["3", "4", "5", "22"], "label": ["1", "2", "3", "4"]},
                "answerKey": "2",
            },
            "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22",
            "B",
        ),
    ],
)
def test_arc(row, prompt, answer):
    (conv,) = arc_conversations([row])
    assert turns(conv) == [("user", prompt), ("assistant", answer)]


def test_arc_skips_rows_whose_key_is_not_a_label():
    row = {"id": "x", "question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}
    assert list(arc_conversations([row])) == []


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        (
            {
                "instruction": "When did Virgin Australia start operating?",
                "context": "Virgin Australia commenced services on 31 August 2000.",
                "response": "On 31 August 2000.",
                "category": "closed_qa",
            },
            "When did Virgin Australia start operating?\n\n"
            "Virgin Australia commenced services on 31 August 2000.",
        ),
        (
            {
                "instruction": "Which is a species of fish? Tope or Rope",
                "context": "",
                "response": "On 31 August 2000.",
                "category": "classification",
            },
            "Which is a species of fish? Tope or Rope",
        ),
    ],
)
def test_dolly(row, prompt):
    (conv,) = dolly_conversations([row])
    assert turns(conv) == [("user", prompt), ("assistant", row["response"])]


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        (
            {
                "input": "",
                "output": "Since 2 + 2 = 4, the answer is 4.",
                "instruction": "What is 2 + 2?",
                "data_source": "MATH/PRM-800K",
            },
            "What is 2 + 2?",
        ),
        (
            {
                "input": "Sentence: The cat sat.",
                "output": "Noun: cat.",
                "instruction": "List the nouns.",
                "data_source": "scienceqa",
            },
            "List the nouns.\n\nSentence: The cat sat.",
        ),
    ],
)
def test_platypus(row, prompt):
    (conv,) = platypus_conversations([row])
    assert turns(conv) == [("user", prompt), ("assistant", row["output"])]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"prompt": "Q?", "response": "A."}, [("user", "Q?"), ("assistant", "A.")]),
        (
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"},
                    {"role": "user", "content": "dangling"},
                ]
            },
            [("system", "S"), ("user", "U"), ("assistant", "A")],
        ),
        ({"messages": [{"role": "user", "content": "no reply"}]}, None),
    ],
)
def test_jsonl_rows(obj, expected):
    conv = jsonl_conversation(obj)
    assert (turns(conv) if conv else None) == expected


@pytest.mark.parametrize(
    "obj",
    [
        {"text": "plain text is not an instruction"},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}]},
        ["not", "an", "object"],
    ],
)
def test_jsonl_rejects_malformed_rows(obj):
    with pytest.raises(DataError):
        jsonl_conversation(obj)


def test_read_jsonl_reports_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("dolly", SourceSpec("dolly", 1.0)),
        ("dolly:0.5", SourceSpec("dolly", 0.5)),
        ("data/mine.jsonl:2", SourceSpec("data/mine.jsonl", 2.0)),
        ("C:/odd/path.jsonl", SourceSpec("C:/odd/path.jsonl", 1.0)),
    ],
)
def test_source_spec_parse(text, spec):
    assert SourceSpec.parse(text) == spec


def test_source_spec_rejects_negative_weights():
    with pytest.raises(DataError):
        SourceSpec.parse("dolly:-1")


@pytest.mark.parametrize(("weight", "n"), [(0.0, 0), (0.5, 5), (1.0, 10), (2.5, 25)])
def test_weighted_sample_sizes(weight, n):
    items = list(range(10))
    out = weighted_sample(items, weight, random.Random(0))
    assert len(out) == n
    if weight >= 1:
        assert set(out) == set(items)


def _convs(name, n):
    return [
        Conversation((Message("user", f"{name}{i}"), Message("assistant", "x")), name)
        for i in range(n)
    ]


def test_mix_holds_out_eval_before_weighting_and_is_seeded():
    a, b = _convs("a", 100), _convs("b", 50)
    sources = [(SourceSpec("a", 2.0), a), (SourceSpec("b", 0.5), b)]
    train, held, counts = mix(sources, eval_fraction=0.1, max_eval=None, seed=3)
    assert [(c.name, c.available, c.train, c.eval) for c in counts] == [
        ("a", 100, 180, 10),
        ("b", 50, 22, 5),
    ]
    assert len(train) == 202 and len(held) == 15
    assert not {c.messages for c in held} & {c.messages for c in train}
    again = mix(sources, eval_fraction=0.1, max_eval=None, seed=3)
    assert again[0] == train and again[1] == held


def test_mix_caps_eval_and_keeps_a_minimum_per_source():
    sources = [(SourceSpec("a"), _convs("a", 1000)), (SourceSpec("b"), _convs("b", 10))]
    _, held, counts = mix(sources, eval_fraction=0.5, max_eval=20, seed=0)
    assert len(held) <= 21 and [c.eval for c in counts] == [20, 1]


# The Hub wiring, with `datasets.load_dataset` answering from hand-written rows: the real ids,
# configs and splits are what this checks (the download itself needs the Hub).
HUB_CALLS = {
    "oasst1": (("OpenAssistant/oasst1", None), {"split": "train"}, OASST_ROWS),
    "lima": (
        ("json",),
        {"data_files": "hf://datasets/GAIR/lima/train.jsonl", "split": "train"},
        [{"conversations": ["Q", "A"], "source": "wikihow"}],
    ),
    "arc-challenge": (
        ("allenai/ai2_arc", "ARC-Challenge"),
        {"split": "train"},
        [
            {
                "id": "1",
                "question": "Q",
                "choices": {"text": ["x"], "label": ["A"]},
                "answerKey": "A",
            }
        ],
    ),
    "arc-easy": (
        ("allenai/ai2_arc", "ARC-Easy"),
        {"split": "train"},
        [
            {
                "id": "1",
                "question": "Q",
                "choices": {"text": ["x"], "label": ["A"]},
                "answerKey": "A",
            }
        ],
    ),
    "dolly": (
        ("databricks/databricks-dolly-15k", None),
        {"split": "train"},
        [{"instruction": "I", "context": "", "response": "R", "category": "open_qa"}],
    ),
    "platypus": (
        ("garage-bAInd/Open-Platypus", None),
        {"split": "train"},
        [{"instruction": "I", "input": "", "output": "O", "data_source": "airoboros"}],
    ),
}


@pytest.mark.parametrize("name", sorted(HUB_CALLS))
def test_hub_sources_call_datasets_with_their_real_ids(monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    from onegpu.train.sources import SOURCES, SourceSpec, load_source

    args, kwargs, rows = HUB_CALLS[name]
    seen = []

    def fake_load_dataset(*a, **k):
        seen.append((a, k))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    convs, where = load_source(SourceSpec(name))
    assert seen == [(args, kwargs)]
    assert convs and all(c.source == name for c in convs)
    assert where["hub"] == SOURCES[name].path
