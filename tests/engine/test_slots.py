"""The slot cache, its attention buckets, and where a new prompt is placed (prefix reuse)."""

from __future__ import annotations

import pytest
import torch

from onegpu.engine.decode_step import additive_mask, kv_bucket
from onegpu.engine.kvcache import SlotCache, bytes_per_token
from onegpu.engine.prefix import Placement, common_prefix, place


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([], [], 0),
        ([1, 2, 3], [], 0),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2, 3], [1, 2, 3, 4], 3),
        (list(range(200)), list(range(200)), 200),
        (list(range(200)), list(range(130)) + [-1] + list(range(131, 200)), 130),
        ([5] * 64 + [1], [5] * 64 + [2], 64),
    ],
)
def test_common_prefix(a, b, expected):
    assert common_prefix(a, b) == expected == common_prefix(b, a)


@pytest.mark.parametrize(
    ("prompt", "resident", "free", "expected"),
    [
        # Nothing cached: the oldest free row, nothing reused.
        ([1, 2, 3], [[], [], []], [2, 0, 1], Placement(row=2, source=2, reuse=0)),
        # A free row holding the prefix is taken and reused in place.
        ([1, 2, 3, 4], [[9], [1, 2, 3, 7], []], [0, 1, 2], Placement(row=1, source=1, reuse=3)),
        # The whole prompt is cached: its last token is still recomputed (its logits are needed).
        ([1, 2, 3], [[1, 2, 3, 4], []], [0, 1], Placement(row=0, source=0, reuse=2)),
        # A busy row (not free) holds a long prefix: copied into the oldest free row.
        (list(range(40)), [list(range(30)), [], []], [1, 2], Placement(row=1, source=0, reuse=30)),
        # ... but not when it beats the free row's own by fewer than min_copy (16) ids.
        (
            list(range(40)),
            [list(range(30)), list(range(20)), []],
            [1, 2],
            Placement(row=1, source=1, reuse=20),
        ),
        # Ties between free rows go to the one freed longest ago.
        ([7, 8], [[7], [7], [7]], [1, 0, 2], Placement(row=1, source=1, reuse=1)),
        # An empty prompt reuses nothing.
        ([], [[1, 2]], [0], Placement(row=0, source=0, reuse=0)),
    ],
)
def test_place(prompt, resident, free, expected):
    assert place(prompt, resident, free) == expected


def test_place_needs_a_free_row():
    with pytest.raises(ValueError, match="no free row"):
        place([1], [[1]], [])


@pytest.mark.parametrize(
    ("needed", "length", "expected"),
    [
        (1, 2048, 64),
        (64, 2048, 64),
        (65, 2048, 128),
        (1000, 2048, 1024),
        (1025, 2048, 2048),
        (2048, 2048, 2048),
        (300, 256, 256),
        (100, 100, 100),
    ],
)
def test_kv_bucket(needed, length, expected):
    assert kv_bucket(needed, length) == expected


def kv(batch, tokens, fill):
    """Key/value states [batch, heads=2, tokens, dim=3] whose value names what wrote them."""
    return torch.full((batch, 2, tokens, 3), float(fill))


def test_prefill_and_decode_write_each_row_in_place_and_idle_rows_to_scratch():
    cache = SlotCache(slots=3, length=8)
    cache.prefill(row=1, start=0, count=4)
    keys, values = cache.update(kv(1, 4, 1), kv(1, 4, -1), layer_idx=0)
    assert keys.shape == (1, 2, 4, 3) and values.shape == (1, 2, 4, 3)
    assert cache.keys[0].shape == (3, 2, 9, 3)  # one scratch column past the 8 positions

    # Prefill continues row 1 from position 4 (a reused prefix stays).
    cache.prefill(row=1, start=4, count=2)
    keys, _ = cache.update(kv(1, 2, 2), kv(1, 2, -2), layer_idx=0)
    assert keys[0, 0, :, 0].tolist() == [1, 1, 1, 1, 2, 2]

    # Decode: row 1 writes position 6; rows 0 and 2 are idle and write to scratch.
    positions = torch.tensor([cache.scratch, 6, cache.scratch])
    cache.decode(positions, kv_len=8)
    step = torch.tensor([7.0, 3.0, 9.0])[:, None, None, None].expand(3, 2, 1, 3)
    keys, _ = cache.update(step, -step, layer_idx=0)
    assert keys.shape == (3, 2, 8, 3)
    assert cache.keys[0][1, 0, :, 0].tolist() == [1, 1, 1, 1, 2, 2, 3, 0, 0]
    assert cache.keys[0][0, 0, :8, 0].tolist() == [0] * 8  # idle rows' positions untouched
    assert cache.keys[0][2, 0, 8, 0] == 9  # ... their output went to scratch
    assert cache.values[0][1, 0, 6, 0] == -3


def test_copy_prefix_copies_every_layer():
    cache = SlotCache(slots=2, length=4)
    for layer in range(2):
        cache.prefill(row=0, start=0, count=3)
        cache.update(kv(1, 3, layer + 1), kv(1, 3, -(layer + 1)), layer_idx=layer)
    cache.copy_prefix(src=0, dst=1, count=2)
    assert cache.keys[1][1, 0, :, 0].tolist() == [2, 2, 0, 0, 0]
    assert cache.values[0][1, 0, :, 0].tolist() == [-1, -1, 0, 0, 0]
    assert cache.nbytes() == 2 * 2 * (2 * 2 * 5 * 3) * 4


@pytest.mark.parametrize(
    ("prefill", "error"),
    [((3, 0, 1), "outside"), ((0, 5, 4), "outside"), ((0, -1, 1), "outside")],
)
def test_prefill_outside_the_cache_is_refused(prefill, error):
    with pytest.raises(ValueError, match=error):
        SlotCache(slots=2, length=8).prefill(*prefill)


def test_update_before_a_mode_is_set_is_an_error():
    with pytest.raises(RuntimeError, match="before prefill"):
        SlotCache(slots=1, length=4).update(kv(1, 1, 0), kv(1, 1, 0), layer_idx=0)


def test_bytes_per_token_of_qwen_14b_and_a_gqa_model():
    from transformers import Qwen2Config

    qwen14 = Qwen2Config(
        hidden_size=5120, num_attention_heads=40, num_key_value_heads=40, num_hidden_layers=40
    )
    assert bytes_per_token(qwen14, torch.float16) == 40 * 2 * 5120 * 2  # 819,200: no GQA
    gqa = Qwen2Config(
        hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, num_hidden_layers=48
    )
    assert bytes_per_token(gqa, torch.bfloat16) == 48 * 2 * 8 * 128 * 2
    assert bytes_per_token(object(), torch.float16) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_additive_mask_is_zero_where_visible_and_never_nan_after_softmax(dtype):
    visible = torch.tensor([[True, True, False], [False, False, False]])
    mask = additive_mask(visible, dtype)
    assert mask.dtype == dtype
    assert mask[0].tolist() == [0, 0, torch.finfo(dtype).min]
    weights = torch.softmax(torch.zeros(2, 3, dtype=torch.float32) + mask.float(), dim=-1)
    assert weights[0].tolist() == [0.5, 0.5, 0.0]
    assert not weights.isnan().any()  # a row that sees nothing is uniform, not NaN
