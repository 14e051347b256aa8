import math
from types import SimpleNamespace

import pytest
import torch

from onegpu.engine.sampling import pick, position_seed, request_seed, suppress, warp
from onegpu.engine.scoring import Scores, choose
from onegpu.engine.types import GenerationRequest
from tests.conftest import DEVICES


def choose_token(logits, *, seed=0, index=0, **kwargs) -> int:
    """One token drawn from one row of logits [V], as the request's `index`-th new token."""
    return int(pick(logits[None], draws=[(seed, index)], **kwargs)[0])


def draws(logits, seed, n, **kwargs) -> list[int]:
    """New tokens 0..n-1 of a request drawn with `seed`, each from the same logits."""
    return [choose_token(logits, seed=seed, index=i, **kwargs) for i in range(n)]


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("temperature", [0.0, 1e-7, 1e-5])
def test_tiny_temperatures_are_greedy(temperature):
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    for seed in range(5):
        assert choose_token(logits, temperature=temperature, top_k=0, top_p=1.0, seed=seed) == 1


def test_just_above_the_greedy_threshold_samples():
    logits = torch.zeros(4)  # uniform: sampling must visit more than one token
    assert len(set(draws(logits, 0, 50, temperature=1e-4, top_k=0, top_p=1.0))) > 1


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
    warped = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    first = draws(logits, 123, 2000, **warped)
    assert first == draws(logits, 123, 2000, **warped)
    assert first != draws(logits, 124, 2000, **warped)
    assert math.isclose(first.count(0) / len(first), 0.9, abs_tol=0.03)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.3, 3, 0.9)])
def test_frequencies_follow_the_warped_probabilities(temperature, top_k, top_p):
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    want = torch.softmax(warp(logits, temperature=temperature, top_k=top_k, top_p=top_p), -1)
    got = draws(logits, 7, 4000, temperature=temperature, top_k=top_k, top_p=top_p)
    for token, p in enumerate(want.tolist()):
        assert math.isclose(got.count(token) / len(got), p, abs_tol=0.025), (token, p)


@pytest.mark.parametrize("temperature", [1e4, 1e39, 1e300, 1.7976931348623157e308])
def test_huge_temperatures_with_suppressed_tokens_stay_samplable(temperature):
    logits = suppress(torch.tensor([8.0, 0.0, 0.0, 0.0]), [0])
    picks = set(draws(logits, 0, 40, temperature=temperature, top_k=0, top_p=1.0))
    assert picks == {1, 2, 3}  # uniform over the rest, never the suppressed token


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("first", "count"), [(0, 5), (17, 3), (4, 1)])
def test_a_token_drawn_among_others_is_the_one_drawn_alone(device, first, count):
    """The draw at an index depends on (seed, index) and that position's logits alone: several
    positions picked in one call give what one call per position gives (speculation's verify)."""
    logits = torch.randn(count, 50, generator=torch.Generator().manual_seed(first)).to(device)
    warped = {"temperature": 0.7, "top_k": 20, "top_p": 0.95}
    together = pick(logits, draws=[(99, first + i) for i in range(count)], **warped).tolist()
    alone = [
        int(pick(logits[i : i + 1], draws=[(99, first + i)], **warped)[0]) for i in range(count)
    ]
    assert together == alone


@pytest.mark.parametrize(
    ("a", "b"),
    [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 0), (0, 1)), ((2**62, 5), (2**62, 6))],
)
def test_position_seeds_differ_by_seed_and_index(a, b):
    assert position_seed(*a) != position_seed(*b)
    assert position_seed(*a) == position_seed(*a)
    assert 0 <= position_seed(*a) < 2**63


@pytest.mark.parametrize(("given", "same"), [(5, True), (0, True), (None, False)])
def test_a_request_draws_with_its_seed_or_a_random_one(given, same):
    seeds = {request_seed(given) for _ in range(3)}
    assert (seeds == {given}) is same
    assert all(0 <= seed < 2**63 for seed in seeds)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (2, 1.0), (0, 0.6), (3, 0.8)])
def test_warp_of_rows_is_warp_of_each_row(top_k, top_p):
    rows = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    together = warp(rows, temperature=0.5, top_k=top_k, top_p=top_p)
    for row, got in zip(rows, together, strict=True):
        assert torch.equal(got, warp(row, temperature=0.5, top_k=top_k, top_p=top_p))


def row(temperature, *, seed=0, scored=0, min_new_tokens=1, top_k=0, top_p=1.0, device="cpu"):
    """What `scoring.choose` reads of a request's output: its request, tokens so far, seed."""
    request = GenerationRequest(
        "", temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens
    )
    generator = None if request.greedy else torch.Generator(device=device)
    return SimpleNamespace(
        request=request, scored=[None] * scored, seed=seed, generator=generator, eos_ids=(0,)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_rows_chosen_in_one_batch_are_those_chosen_alone(device):
    """Sampled rows that share a warp are drawn together; each keeps its own (seed, index), and
    greedy and suppressed rows beside them are unchanged."""
    rows = [
        row(0.0, device=device),
        row(0.7, seed=1, scored=3, top_k=20, device=device),
        row(0.7, seed=2, scored=0, top_k=20, device=device),
        row(1.3, seed=1, scored=3, top_p=0.9, device=device),
        row(0.0, min_new_tokens=2, device=device),  # end-of-text (id 0) suppressed
        row(0.7, seed=3, scored=9, top_k=20, device=device),
    ]
    logits = torch.randn(len(rows), 64, generator=torch.Generator().manual_seed(0)).to(device)
    logits[4, 0] = 50.0
    together = choose(logits, rows).tolist()
    alone = [int(choose(logits[i : i + 1], [r])[0]) for i, r in enumerate(rows)]
    assert together == alone
    assert together[4] != 0 and together[0] == int(logits[0].argmax())


@pytest.mark.parametrize(
    ("temperature", "scored", "min_new_tokens", "ahead"),
    [
        (0.7, 3, 1, 1),  # sampled: drawn as the 5th token, not the 4th
        (0.7, 0, 1, 2),
        (0.0, 1, 3, 1),  # greedy: end-of-text still suppressed (token 3 of 3)
        (0.0, 2, 3, 1),  # greedy: token 4, past min_new_tokens, may end
    ],
)
def test_a_choice_ahead_is_the_one_made_once_the_tokens_in_flight_are_recorded(
    temperature, scored, min_new_tokens, ahead
):
    """`ahead` counts tokens chosen but not recorded (an overlapped step): the choice is the
    one the request makes with those recorded, for the draw index and for suppression alike."""
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    logits[0, 0] = 50.0  # end-of-text (id 0) is the argmax unless suppressed
    before = row(temperature, seed=4, scored=scored, min_new_tokens=min_new_tokens)
    after = row(temperature, seed=4, scored=scored + ahead, min_new_tokens=min_new_tokens)
    now = row(temperature, seed=4, scored=scored, min_new_tokens=min_new_tokens)
    got = choose(logits, [before], ahead=ahead)
    assert torch.equal(got, choose(logits, [after]))
    if temperature:  # a different index draws different noise: `ahead` is not ignored
        draws = {int(choose(logits * 0.01, [now], ahead=a)[0]) for a in range(8)}
        assert len(draws) > 1
    else:
        assert (int(got[0]) == 0) is (scored + ahead >= min_new_tokens)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_choosing_and_scoring_a_step_never_waits_for_the_device():
    """An overlapped step chooses and scores its tokens while the next pass is queued: any
    wait for the device there (a list index copied to the GPU, a `.item()`) would idle it."""
    rows = [
        row(0.0, device="cuda"),
        row(0.7, seed=1, scored=3, top_k=20, device="cuda"),
        row(0.7, seed=2, top_k=20, device="cuda"),
        row(1.3, seed=1, scored=3, top_p=0.9, device="cuda"),
        row(0.0, min_new_tokens=3, device="cuda"),  # end-of-text suppressed
    ]
    logits = torch.randn(len(rows), 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        chosen = choose(logits, rows, ahead=1)
        scores = Scores(logits, chosen, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [item.token_id for item in scores.read(str)] == chosen.tolist()
