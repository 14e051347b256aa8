"""Sliding-window perplexity: window plans, alignment of targets, agreement with transformers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from onegpu.quantize.perplexity import Window, perplexity, windows


@pytest.mark.parametrize(
    ("n_tokens", "max_length", "stride", "expected"),
    [
        # non-overlapping chunks (GPTQ paper style): a chunk's first token has no context
        (10, 4, 4, [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]),
        # overlapping windows score only what earlier windows did not
        (10, 4, 2, [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]),
        # everything fits in one window
        (5, 8, 8, [Window(0, 5, 1)]),
        (5, 8, 2, [Window(0, 5, 1)]),
        (2, 2, 1, [Window(0, 2, 1)]),
        # a final window that would only re-read scored tokens is not run
        (9, 4, 4, [Window(0, 4, 1), Window(4, 8, 5)]),
        (1, 4, 4, []),
    ],
)
def test_windows_table(n_tokens, max_length, stride, expected):
    assert windows(n_tokens, max_length=max_length, stride=stride) == expected


@pytest.mark.parametrize("n_tokens", [2, 3, 17, 100, 257])
@pytest.mark.parametrize(("max_length", "stride"), [(8, 8), (8, 3), (8, 1), (16, 5), (2, 1)])
def test_windows_score_each_token_at_most_once_with_context(n_tokens, max_length, stride):
    plan = windows(n_tokens, max_length=max_length, stride=stride)
    scored = [t for w in plan for t in range(w.score_from, w.end)]
    if stride < max_length:
        # overlapping windows: every token after the first is scored exactly once
        assert scored == list(range(1, n_tokens))
    else:
        # non-overlapping chunks: all but each chunk's first token
        assert scored == [t for t in range(n_tokens) if t % max_length]
    for w in plan:
        assert w.end - w.begin <= max_length
        assert w.begin < w.score_from < w.end  # every target has at least one token of context


@pytest.mark.parametrize(("max_length", "stride"), [(1, 1), (4, 0), (4, 5)])
def test_windows_reject_bad_settings(max_length, stride):
    with pytest.raises(ValueError):
        windows(10, max_length=max_length, stride=stride)


class UniformLM(torch.nn.Module):
    """Assigns equal probability to every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, *, logits_to_keep, use_cache):
        return SimpleNamespace(logits=torch.zeros(1, logits_to_keep, self.vocab))


class CounterLM(torch.nn.Module):
    """Predicts token x+1 after token x with probability ~1: catches off-by-one target shifts."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, *, logits_to_keep, use_cache):
        kept = input_ids[:, -logits_to_keep:]  # [1, K]
        logits = torch.full((1, kept.shape[1], self.vocab), -30.0)
        logits.scatter_(-1, ((kept + 1) % self.vocab).unsqueeze(-1), 30.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("max_length", "stride"), [(16, 16), (16, 5), (7, 1)])
def test_uniform_model_has_perplexity_equal_to_vocab(max_length, stride):
    ids = torch.randint(0, 50, (1, 123), generator=torch.Generator().manual_seed(0))
    result = perplexity(UniformLM(50), ids, max_length=max_length, stride=stride, progress=False)
    assert result.ppl == pytest.approx(50.0)
    expected = 122 if stride < max_length else 123 - math.ceil(123 / max_length)
    assert result.n_tokens == expected


@pytest.mark.parametrize(("max_length", "stride"), [(16, 16), (16, 5), (7, 1), (200, 50)])
def test_perfect_predictor_has_perplexity_one(max_length, stride):
    ids = torch.arange(100) % 11
    result = perplexity(CounterLM(11), ids, max_length=max_length, stride=stride, progress=False)
    assert result.ppl == pytest.approx(1.0, abs=1e-6)
    # the same model scored on a shuffled sequence is badly wrong: the check can fail
    shuffled = ids[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    bad = perplexity(CounterLM(11), shuffled, max_length=max_length, stride=stride, progress=False)
    assert bad.ppl > 1e6


def test_max_tokens_truncates():
    ids = torch.arange(100) % 11
    result = perplexity(UniformLM(11), ids, max_tokens=40, max_length=16, stride=8, progress=False)
    assert result.n_tokens == 39


@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits, so perplexity differs clearly from vocab size
    )
    return Qwen2ForCausalLM(config).eval()


def test_single_window_matches_transformers_loss(tiny_qwen2):
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1))
    result = perplexity(tiny_qwen2, ids, max_length=64, stride=64, progress=False)
    with torch.no_grad():
        loss = tiny_qwen2(ids, labels=ids).loss.item()
    assert result.nll == pytest.approx(loss, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_non_overlapping_windows_match_per_chunk_losses(tiny_qwen2):
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(2))
    result = perplexity(tiny_qwen2, ids, max_length=30, stride=30, progress=False)
    with torch.no_grad():
        # transformers' loss: the mean over a chunk's 29 shifted targets
        losses = [tiny_qwen2(c, labels=c).loss.item() for c in ids.split(30, dim=1)]
    assert result.n_tokens == 87
    assert result.nll == pytest.approx(sum(losses) / 3, rel=1e-5)
