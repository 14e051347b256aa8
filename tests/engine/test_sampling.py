import math

import pytest
import torch

from onegpu.engine.sampling import pick, suppress, warp


def choose_token(logits, **kwargs) -> int:
    return int(pick(logits, **kwargs))


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("temperature", [0.0, 1e-7, 1e-5])
def test_tiny_temperatures_are_greedy(temperature):
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert choose_token(logits, temperature=temperature, top_k=0, top_p=1.0, generator=g) == 1


def test_just_above_the_greedy_threshold_samples():
    logits = torch.zeros(4)  # uniform: sampling must visit more than one token
    g = torch.Generator().manual_seed(0)
    picks = {
        choose_token(logits, temperature=1e-4, top_k=0, top_p=1.0, generator=g) for _ in range(50)
    }
    assert len(picks) > 1


@pytest.mark.parametrize(
    ("top_k", "top_p", "kept"),
    [
        (0, 1.0, [0, 1, 2]),  # no filter
        (3, 1.0, [0, 1, 2]),  # k == V disables
        (1, 1.0, [0]),
        (2, 1.0, [0, 1]),
        (0, 0.5, [0]),  # the first token alone reaches 0.5
        (0, 0.6, [0, 1]),
        (0, 0.85, [0, 1, 2]),
        (0, 1e-9, [0]),  # the most likely token always survives
        (2, 0.6, [0]),  # top-p applies to the top-k survivors, renormalized: 0.625 >= 0.6
    ],
)
def test_warp_keeps_the_expected_tokens(top_k, top_p, kept):
    scores = warp(LOGITS, temperature=1.0, top_k=top_k, top_p=top_p)
    assert torch.isfinite(scores).nonzero().flatten().tolist() == kept


def test_warp_temperature_sharpens_and_flattens():
    sharp = torch.softmax(warp(LOGITS, temperature=0.5, top_k=0, top_p=1.0), -1)
    flat = torch.softmax(warp(LOGITS, temperature=2.0, top_k=0, top_p=1.0), -1)
    assert sharp[0] > 0.5 > flat[0]


def test_top_p_order_does_not_depend_on_token_position():
    scores = warp(torch.log(torch.tensor([0.2, 0.5, 0.3])), temperature=1.0, top_k=0, top_p=0.6)
    assert torch.isfinite(scores).tolist() == [False, True, True]


@pytest.mark.parametrize(
    ("ids", "masked"),
    [([], []), ([2], [2]), ([0, 3], [0, 3]), ([7, -1], []), ([1, 99], [1])],
)
def test_suppress_masks_only_valid_ids(ids, masked):
    logits = torch.zeros(4)
    out = suppress(logits, ids)
    assert torch.isinf(out).nonzero().flatten().tolist() == masked
    assert torch.equal(logits, torch.zeros(4)), "the input must not be modified"


def test_same_seed_same_samples_and_frequencies_follow_probabilities():
    logits = torch.log(torch.tensor([0.9, 0.1]))

    def draws(seed, n=2000):
        g = torch.Generator().manual_seed(seed)
        return [
            choose_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=g) for _ in range(n)
        ]

    first = draws(123)
    assert first == draws(123)
    assert first != draws(124)
    assert math.isclose(first.count(0) / len(first), 0.9, abs_tol=0.03)


@pytest.mark.parametrize("temperature", [1e4, 1e39, 1e300, 1.7976931348623157e308])
def test_huge_temperatures_with_suppressed_tokens_stay_samplable(temperature):
    logits = suppress(torch.tensor([8.0, 0.0, 0.0, 0.0]), [0])
    g = torch.Generator().manual_seed(0)
    picks = {
        choose_token(logits, temperature=temperature, top_k=0, top_p=1.0, generator=g)
        for _ in range(40)
    }
    assert picks == {1, 2, 3}  # uniform over the rest, never the suppressed token
