"""bench/step_trace.py: steps classed by what they ran, and the order they ran in."""

from __future__ import annotations

import pytest

from tests.conftest import bench_module

step_trace = bench_module("step_trace")


@pytest.mark.parametrize(
    ("classes", "runs"),
    [
        ([], []),
        (["decode 8"], ["decode 8"]),
        (["decode 8", "decode 8", "decode 1"], ["decode 8 x2", "decode 1"]),
        (["a", "a", "b", "a", "c", "c", "c"], ["a x2", "b", "a", "c x3"]),  # a run again later
    ],
)
def test_the_timeline_folds_each_run_of_one_class(classes, runs):
    assert step_trace.timeline(classes) == runs


@pytest.mark.parametrize(
    ("step", "name"),
    [
        ({"prefill": 700, "decode": 0, "verify": 0}, "prefill <1024"),
        ({"prefill": 2048, "decode": 4, "verify": 0}, "prefill >=2048 + decode 4"),
        ({"prefill": 0, "decode": 0, "verify": 10}, "verify 10"),
        ({"prefill": 63, "decode": 1, "verify": 0}, "prefill <64 + decode 1"),
    ],
)
def test_a_step_is_classed_by_what_it_ran(step, name):
    assert step_trace._class_of(step) == name


def test_the_summary_keeps_the_window_and_its_order():
    trace = step_trace.StepTrace(engine=None)
    trace.steps = [
        {"start": 0.5, "seconds": 0.1, "prefill": 900, "decode": 0, "verify": 0, "drafted": 0},
        {"start": 1.0, "seconds": 0.2, "prefill": 0, "decode": 8, "verify": 0, "drafted": 0},
        {"start": 1.5, "seconds": 0.2, "prefill": 0, "decode": 8, "verify": 0, "drafted": 0},
        {"start": 2.0, "seconds": 0.1, "prefill": 0, "decode": 1, "verify": 0, "drafted": 0},
        {"start": 9.0, "seconds": 0.1, "prefill": 0, "decode": 1, "verify": 0, "drafted": 0},
    ]
    summary = trace.summary(1.0, 3.0)
    assert summary["timeline"] == ["decode 8 x2", "decode 1"]
    assert summary["steps"] == 3
    assert summary["busy_s"] == pytest.approx(0.5)
    assert summary["idle_s"] == pytest.approx(1.5)
    assert "in order: decode 8 x2 | decode 1" in step_trace.report("summarization", summary)
