"""Pure pieces of the training loop: schedule, NEFTune, the reply-only loss, resuming order."""

import math

import pytest
import torch

from onegpu.train.batching import collate
from onegpu.train.format import IGNORE_INDEX, TokenizedExample
from onegpu.train.loop import add_neftune, loss_sum, lr_factor, micro_batches, neftune_noise
from tests.conftest import tiny_qwen2


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.25),  # warm-up: 1/4, 2/4, 3/4, 4/4
        (1, 0.5),
        (3, 1.0),
        (4, 1.0),  # first step after warm-up: the cosine's top
        (9, 0.55),  # halfway down: min + (1 - min) / 2
        (14, 0.1),  # last step: the floor
        (20, 0.1),  # past the end: stays at the floor
    ],
)
def test_lr_factor_warms_up_then_follows_a_cosine(step, expected):
    got = lr_factor(step, warmup_steps=4, total_steps=15, min_ratio=0.1)
    assert got == pytest.approx(expected)


def test_lr_factor_without_warmup_starts_at_the_peak():
    assert lr_factor(0, warmup_steps=0, total_steps=10) == 1.0
    assert lr_factor(9, warmup_steps=0, total_steps=10) == pytest.approx(0.0)
    assert lr_factor(0, warmup_steps=0, total_steps=1) == 1.0


def test_neftune_noise_has_the_paper_scale():
    embeds = torch.zeros(2, 50, 64)
    noise = neftune_noise(embeds, alpha=5.0, generator=torch.Generator().manual_seed(0))
    bound = 5.0 / math.sqrt(50 * 64)
    assert noise.abs().max() <= bound
    assert noise.abs().max() > 0.9 * bound  # uniform on [-bound, bound]


def test_neftune_hook_is_active_only_while_training():
    model = tiny_qwen2(vocab_size=64)
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = model.get_input_embeddings()(ids)
    handle = add_neftune(model, alpha=5.0)
    try:
        model.eval()
        assert torch.equal(model.get_input_embeddings()(ids), clean)
        model.train()
        assert not torch.equal(model.get_input_embeddings()(ids), clean)
    finally:
        handle.remove()


def test_reply_only_loss_equals_cross_entropy_of_the_full_logits():
    model = tiny_qwen2(vocab_size=96, seed=2)
    ids = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]]
    labels = [[IGNORE_INDEX] * 3 + ids[0][3:], [IGNORE_INDEX] * 5 + ids[1][5:]]
    batch = collate(
        [[TokenizedExample(i, lab)] for i, lab in zip(ids, labels, strict=True)], pad_id=0
    )
    with torch.no_grad():
        total, n = loss_sum(model, batch, chunk=2)
        full = model(input_ids=batch.input_ids).logits  # [B, T, V]
    reference = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, 96), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert n == 4 + 2
    torch.testing.assert_close(total / n, reference, atol=1e-5, rtol=1e-5)


def test_micro_batches_resume_where_they_stopped_across_epochs():
    def epoch(e):
        return [f"e{e}b{i}" for i in range(3)]

    stream = micro_batches(epoch, start=0)
    straight = [next(stream) for _ in range(8)]
    resumed = micro_batches(epoch, start=4)
    assert [next(resumed) for _ in range(4)] == straight[4:]
