"""bench/load.py's rule for a mixed-up answer, apart from an fp16 near-tie divergence."""

from __future__ import annotations

import pytest

from tests.conftest import bench_module

compare = bench_module("load").compare
A = [(" Paris", -0.5), (" is", -1.0), (" nice", -2.0)]


@pytest.mark.parametrize(
    ("again", "expected"),
    [
        (A, "same"),
        ([(" Paris", -0.504), (" is", -1.0078), (" nice", -2.0)], "same"),  # fp16 steps
        ([(" London", -0.5), (" is", -1.0), (" nice", -2.0)], "mixed"),  # another prompt's
        ([(" Paris", -0.9), (" is", -1.0), (" nice", -2.0)], "mixed"),  # same text, other scores
        ([(" Paris", -0.5), (" is", -1.0), (" big", -2.1)], "diverged"),  # a near-tie, late
        ([(" Paris", -0.5), (" is", -1.5), (" nice", -2.0)], "mixed"),  # scores apart, same text
        ([(" Paris", -0.5), (" is", -1.0)], "diverged"),  # stopped earlier after agreeing
        ([], "diverged"),
    ],
)
def test_compare(again, expected):
    assert compare(A, again, tol=0.02) == expected
