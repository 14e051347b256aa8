"""bench/decode.py: a profiled step's GPU time split into kernels, pauses inside a pass and
pauses between passes."""

from __future__ import annotations

import pytest

from tests.conftest import bench_module

decode = bench_module("decode")


@pytest.mark.parametrize(
    ("intervals", "steps", "busy", "inside", "between"),
    [
        ([], 1, 0.0, 0.0, 0.0),
        ([(0, 10)], 1, 10.0, 0.0, 0.0),
        ([(0, 10), (12, 20)], 1, 18.0, 2.0, 0.0),  # a launch gap inside a pass
        ([(0, 10), (110, 120)], 2, 10.0, 0.0, 50.0),  # the host's turn between two passes
        ([(0, 10), (5, 8), (9, 15), (20, 30)], 1, 25.0, 5.0, 0.0),  # overlapping kernels
        ([(50, 60), (0, 10)], 1, 20.0, 0.0, 40.0),  # out of order; a gap of exactly the limit
    ],
)
def test_the_gpu_timeline_splits_busy_time_and_pauses(intervals, steps, busy, inside, between):
    got = decode.gpu_timeline(intervals, steps)
    assert got == {
        "busy_ms_per_step": busy / 1e3,
        "between_kernels_ms_per_step": inside / 1e3,
        "between_passes_ms_per_step": between / 1e3,
    }
