import math

import pytest
import torch

from onegpu.engine.logprobs import LOGPROB_FLOOR, finite, gather_logprobs


def test_gather_is_the_raw_log_softmax_and_top_k_is_sorted():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    got = gather_logprobs(logits, torch.tensor([1, 2]), k=2)
    chosen, values, ids = got.chosen, got.top_values, got.top_ids
    assert got.targets.tolist() == [1, 2]
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(chosen, torch.stack([expected[0, 1], expected[1, 2]]))
    assert ids[0].tolist() == [0, 1] and ids[1, 0] == 2
    assert torch.allclose(values[0], expected[0, :2])
    assert values[1, 0] > values[1, 1]


@pytest.mark.parametrize("k", [1, 5, 100])
def test_k_is_capped_by_the_vocabulary(k):
    got = gather_logprobs(torch.zeros(3, 7), torch.tensor([0, 1, 2]), k=k)
    values, ids = got.top_values, got.top_ids
    assert values.shape == ids.shape == (3, min(k, 7))


@pytest.mark.parametrize(
    ("row", "best"),
    [
        ([0.0, 3.0, 1.0], 1),
        ([5.0, -1.0, float("-inf")], 0),
        ([float("-inf"), 0.0, 2.0], 2),
        ([-2.0, -1.0, 4.0], 2),
    ],
)
def test_one_alternative_is_the_most_likely_token(row, best):
    got = gather_logprobs(torch.tensor([row]), torch.tensor([0]), k=1)
    expected = torch.log_softmax(torch.tensor(row), -1)[best]
    assert got.top_ids.tolist() == [[best]]
    assert math.isclose(float(got.top_values[0, 0]), float(expected), rel_tol=1e-6)


def test_impossible_and_nan_scores_become_the_finite_floor():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("nan"), 0.0, 0.0]])
    got = gather_logprobs(logits, torch.tensor([1, 1]), k=3)
    chosen, values = got.chosen, got.top_values
    assert torch.isfinite(chosen).all() and torch.isfinite(values).all()
    assert chosen[0] == LOGPROB_FLOOR


def test_half_precision_logits_are_scored_in_float32():
    logits = torch.tensor([[30.0, 0.0, -30.0]], dtype=torch.float16)
    chosen = gather_logprobs(logits, torch.tensor([2]), k=1).chosen
    assert chosen.dtype == torch.float32
    assert math.isclose(float(chosen[0]), -60.0, abs_tol=1e-3)


def test_ids_past_float32_precision_come_back_exact():
    vocab = 2**24 + 3  # float32 cannot tell 2**24 + 1 from 2**24
    logits = torch.zeros(1, vocab)
    logits[0, vocab - 2] = 9.0
    got = gather_logprobs(logits, torch.tensor([vocab - 2]), k=1)
    assert got.targets.tolist() == [vocab - 2] and got.top_ids.tolist() == [[vocab - 2]]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1.5, -1.5),
        (0.0, 0.0),
        (float("nan"), LOGPROB_FLOOR),
        (float("-inf"), LOGPROB_FLOOR),
        (float("inf"), 0.0),
        (-1e30, LOGPROB_FLOOR),
    ],
)
def test_finite(value, expected):
    assert finite(value) == expected
