"""Packing and padding: rows, position ids, and no attention across examples."""

import random

import pytest
import torch

from onegpu.train.batching import collate, make_batches, pack
from onegpu.train.format import IGNORE_INDEX, TokenizedExample
from onegpu.train.loop import loss_sum
from tests.conftest import tiny_qwen2

VOCAB = 384


def example(n: int, seed: int, n_context: int = 2) -> TokenizedExample:
    rng = random.Random(seed)
    ids = [rng.randrange(1, VOCAB) for _ in range(n)]
    return TokenizedExample(ids, [IGNORE_INDEX] * min(n_context, n) + ids[n_context:])


EXAMPLES = [example(n, seed=i) for i, n in enumerate([7, 3, 12, 5, 9, 1, 16, 4])]


@pytest.mark.parametrize("max_length", [16, 20, 40])
def test_pack_keeps_order_and_fills_rows_within_the_limit(max_length):
    rows = pack(EXAMPLES, max_length)
    assert [ex for row in rows for ex in row] == EXAMPLES
    assert all(sum(len(ex) for ex in row) <= max_length for row in rows)
    # Next-fit: a row was closed only because the next example did not fit in it.
    for row, nxt in zip(rows, rows[1:], strict=False):
        assert sum(len(ex) for ex in row) + len(nxt[0]) > max_length


def test_pack_rejects_examples_longer_than_a_row():
    with pytest.raises(ValueError):
        pack([example(9, 0)], 8)


def test_collate_restarts_positions_per_example_and_pads_as_its_own_segment():
    a, b, c = example(3, 0), example(2, 1), example(4, 2)
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch.input_ids.tolist() == [a.input_ids + b.input_ids, c.input_ids + [0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.labels.tolist() == [a.labels + b.labels, c.labels + [IGNORE_INDEX]]
    assert batch.n_examples == 3
    assert batch.n_targets == a.n_targets + b.n_targets + c.n_targets


def test_make_batches_is_seeded_and_covers_every_example():
    kwargs = {"batch_size": 1, "max_length": 16, "packing": False, "pad_id": 0}
    first = make_batches(EXAMPLES, seed=1, **kwargs)
    again = make_batches(EXAMPLES, seed=1, **kwargs)
    other = make_batches(EXAMPLES, seed=2, **kwargs)
    rows = [b.input_ids[0].tolist() for b in first]
    assert rows == [b.input_ids[0].tolist() for b in again]
    assert rows != [b.input_ids[0].tolist() for b in other]
    assert sorted(rows) == sorted(ex.input_ids for ex in EXAMPLES)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    m = tiny_qwen2(vocab_size=VOCAB, seed=1)
    m.set_attn_implementation(request.param)
    return m


def logits(model, input_ids, position_ids=None):
    with torch.no_grad():
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.logits  # [B, T, V]


def test_packed_examples_attend_only_to_themselves(model):
    rows = pack(EXAMPLES, 40)
    batch = collate(rows, pad_id=0)  # 2+ rows, each several examples, with padding
    packed = logits(model, batch.input_ids, batch.position_ids)
    for r, row in enumerate(rows):
        offset = 0
        for ex in row:
            alone = logits(model, torch.tensor([ex.input_ids]))[0]
            got = packed[r, offset : offset + len(ex)]
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)
            offset += len(ex)


def test_without_restarting_positions_the_same_row_would_leak(model):
    # The check above can fail: drop position ids and the second example sees the first.
    a, b = EXAMPLES[0], EXAMPLES[2]
    row = torch.tensor([a.input_ids + b.input_ids])
    alone = logits(model, torch.tensor([b.input_ids]))[0]
    assert not torch.allclose(logits(model, row)[0, len(a) :], alone, atol=1e-3)


def test_packed_loss_is_the_sum_of_each_example_alone(model):
    batch = collate(pack(EXAMPLES, 40), pad_id=0)
    packed, n = loss_sum(model, batch, chunk=7)
    singles = [loss_sum(model, collate([[ex]], pad_id=0)) for ex in EXAMPLES]
    assert (
        n
        == sum(k for _, k in singles)
        == sum(ex.n_targets - (ex.labels[0] != IGNORE_INDEX) for ex in EXAMPLES)
    )
    torch.testing.assert_close(packed, sum(s for s, _ in singles), atol=1e-3, rtol=1e-5)
