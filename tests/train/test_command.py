"""`onegpu train`: arguments reach `train(...)` as keywords; left-out ones keep its defaults."""

import argparse
import inspect

import pytest

from onegpu.train import command, run


def parse(argv):
    parser = argparse.ArgumentParser(prog="onegpu")
    command.register(parser.add_subparsers(dest="job", required=True))
    return parser.parse_args(["train", *argv])


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(run, "train", lambda *a, **k: seen.append(("train", a, k)) or a[2])
    monkeypatch.setattr(run, "merge", lambda *a, **k: seen.append(("merge", a, k)) or a[2])
    return seen


def test_arguments_become_train_keywords(calls):
    args = parse(
        [
            "--model", "base", "--data", "dolly:0.5", "--data", "mine.jsonl",
            "--output", "out", "--packing", "--max-steps", "10", "--lr", "1e-4",
            "--target-modules", "q_proj, v_proj", "--no-gradient-checkpointing",
            "--quantization", "nf4", "--gpu-memory-gib", "24",
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    ((name, positional, kwargs),) = calls
    assert name == "train" and positional == ("base", ["dolly:0.5", "mine.jsonl"], "out")
    assert kwargs == {
        "packing": True,
        "max_steps": 10,
        "lr": 1e-4,
        "target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": False,
        "quantization": "nf4",
        "gpu_memory_gib": 24.0,
    }


def test_every_option_is_a_train_keyword():
    # A flag that does not match a keyword of train() would fail only when a user passes it.
    keywords = set(inspect.signature(run.train).parameters)
    assert "max_length" in keywords
    dests = {a.dest for a in _train_parser()._actions} - command._NOT_TRAIN - {"help"}
    assert dests <= keywords


def _train_parser():
    parser = argparse.ArgumentParser(prog="onegpu")
    sub = parser.add_subparsers(dest="job")
    command.register(sub)
    return sub.choices["train"]


def test_merge_only_merges_without_training(calls):
    args = parse(["--output", "out/adapter/", "--merge-only", "--merge-base", "bf16"])
    assert args.func(args) == 0
    assert calls == [("merge", ("out/adapter/", "bf16", "out/adapter-merged"), {})]


def test_training_needs_a_model_and_data(calls):
    args = parse(["--output", "out"])
    with pytest.raises(SystemExit):
        args.func(args)
    assert calls == []
