"""Batch invariance (`--deterministic`): a row's numbers never depend on the rows beside it.

The CPU path rests on one property of the BLAS torch uses: with rows padded to a multiple of
ROW_TILE, each row of a product is computed the same way whatever the row count (with MKL's
strict reproducibility, which conftest sets as `onegpu serve --deterministic` does). The first
tests hold that property on this machine and check that the engine refuses a BLAS without it;
the rest check that the
engine built on it answers bit for bit the same alone, in a batch, after a preemption, from a
cached prefix and across chunk boundaries.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from onegpu.engine import invariant
from onegpu.engine.attention import Pass, invariant_reference, prefill_reference
from onegpu.engine.invariant import (
    ROW_TILE,
    DeterminismError,
    PaddedRows,
    is_projection,
    make_invariant,
    rows_computed_alike,
)
from onegpu.engine.kvcache import PagedKVCache
from onegpu.engine.types import GenerationRequest
from tests.conftest import DEVICES, make_engine, tiny_qwen2

ROWS = [1, 2, 3, 5, 8, 9, 17, 31, 64, 100, 257]


def padded(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % ROW_TILE))


@pytest.mark.parametrize(("k", "n"), [(896, 1152), (896, 4864), (4864, 896), (64, 151936)])
def test_the_blas_computes_padded_rows_alike_whatever_their_count(k, n):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(max(ROWS), k)
    first = torch.nn.functional.linear(padded(x[:1]), weight, bias)[0]
    for rows in ROWS:
        out = torch.nn.functional.linear(padded(x[:rows]), weight, bias)
        assert torch.equal(out[0], first), f"row 0 changed with {rows} rows"
    assert rows_computed_alike(k, n)


def test_the_probe_finds_a_blas_that_computes_rows_by_their_count():
    def by_count(x, weight):  # a last bit that depends on how many rows share the product
        return torch.nn.functional.linear(x, weight) + 1e-6 * (x.shape[0] > ROW_TILE)

    assert rows_computed_alike(64, 40, linear=torch.nn.functional.linear)
    assert not rows_computed_alike(64, 40, linear=by_count)
    assert rows_computed_alike(64, 40, linear=by_count, rows=(1, 3, 8))  # one tile only


def test_a_blas_without_the_property_is_refused_with_the_setting_that_gives_it(monkeypatch):
    monkeypatch.setattr(invariant, "rows_computed_alike", lambda k, n: (k, n) != (64, 128))
    model = tiny_qwen2(vocab_size=300)
    shapes = {(m.in_features, m.out_features) for m in model.modules() if is_projection(m)}
    assert (64, 128) in shapes
    with pytest.raises(DeterminismError, match="MKL_CBWR=AUTO,STRICT"):
        make_invariant(model)
    assert not any(isinstance(m, PaddedRows) for m in model.modules())  # nothing swapped


def test_padded_rows_compute_what_the_layer_computes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    wrapped = PaddedRows(linear)
    x = torch.randn(3, 5, 48)
    assert wrapped(x).shape == (3, 5, 40)
    torch.testing.assert_close(wrapped(x), linear(x))
    assert wrapped.in_features == 48 and wrapped.weight is linear.weight


def test_make_invariant_wraps_every_projection_once():
    model = tiny_qwen2(vocab_size=300)
    projections = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert make_invariant(model) == projections
    assert make_invariant(model) == 0  # already done
    assert isinstance(model.lm_head, PaddedRows)


def cached_sequence(length: int, block_size: int = 16, kv_heads: int = 2, dim: int = 8):
    """One sequence of `length` random positions in a pool: its layer and block table."""
    torch.manual_seed(1)
    blocks = -(-length // block_size)
    table = list(range(1, blocks + 1))
    slots = torch.tensor(
        [table[p // block_size] * block_size + p % block_size for p in range(length)]
    )
    keys, values = torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim)
    layer = PagedKVCache(blocks + 1, block_size).write(0, keys, values, slots)
    return layer, table


def one_sequence(table: list[int], length: int, queries: int, *, decode: bool = False) -> Pass:
    """A pass of `queries` queries of the sequence, the last at position length - 1."""
    return Pass(
        cache=None,
        decode=decode,
        slots=torch.zeros(0, dtype=torch.long),
        tables=torch.tensor([table], dtype=torch.int32),
        lengths=torch.tensor([length], dtype=torch.int32),
        host_lengths=[length],
        host_query_start=[0, queries],
        invariant=True,
    )


def test_a_query_gets_the_same_attention_in_decode_and_in_any_prefill_chunk():
    length, heads, dim, scale = 300, 4, 8, 0.3
    layer, table = cached_sequence(length)
    q = torch.randn(length, heads, dim)
    whole = invariant_reference(q, layer, one_sequence(table, length, length), scale)
    expected = prefill_reference(q, layer, one_sequence(table, length, length), scale)
    torch.testing.assert_close(whole, expected)  # it is attention
    for split in (1, 17, 255, 299):  # the prompt's last part as a chunk of its own
        rest = invariant_reference(
            q[split:], layer, one_sequence(table, length, length - split), scale
        )
        assert torch.equal(rest, whole[split:])
    for position in (0, 15, 16, 255, 256, 299):  # one decode row at that position
        row = q[position : position + 1]
        got = invariant_reference(
            row, layer, one_sequence(table, position + 1, 1, decode=True), scale
        )
        assert torch.equal(got[0], whole[position])


PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Question: which is larger, 3 or 5? Answer: 5.\nQuestion: which is larger, 9 or 2? Answer:",
    "Question: which is larger, 3 or 5? Answer: 5.\nQuestion: which is larger, 7 or 8? Answer:",
    "x",
    "A much longer prompt about the weather in Paris in the spring, and then some more words",
]


def requests(tokens: int = 40) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt=p, max_new_tokens=tokens, temperature=0, top_k_per_token=3)
        for p in PROMPTS
    ]


def together(engine, batch):
    futures = []
    for request in batch:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        engine.admit(request, future)
        futures.append(future)
    while not all(f.done() for f in futures):
        engine.step()
    return [f.result() for f in futures]


def identical(a, b) -> bool:
    """Bit for bit: tokens, text, every logprob and every alternative."""
    return (
        a.token_ids == b.token_ids
        and a.text == b.text
        and [(t.logprob, t.top_logprob) for t in a.tokens]
        == [(t.logprob, t.top_logprob) for t in b.tokens]
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_answers_are_bit_identical_alone_and_together(device, qwen_tokenizer):
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = tiny_qwen2(vocab_size=len(qwen_tokenizer)).to(dtype)
    # Small prefill chunks (prompts cut at different places), a small pool (preemptions).
    engine = make_engine(
        model, qwen_tokenizer, device=device, deterministic=True, prefill_chunk=16,
        max_context=256, num_blocks=18, default_stop=(),
    )  # fmt: skip
    alone = [engine.generate(r) for r in requests()]
    assert engine.scheduler.preemptions == 0
    batched = together(engine, requests())  # prefixes now cached, every row sharing passes
    assert engine.scheduler.preemptions > 0  # 5 x 4 blocks do not fit in 17
    assert engine.scheduler.reused_tokens > 0
    for a, b in zip(alone, batched, strict=True):
        assert identical(a, b)


# -- the CUDA kernels (Triton's interpreter on the CPU) -------------------------------------------


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ packing: 32 // bits consecutive values along `dim` in one int32, lowest bits first."""
    per = 32 // bits
    values = values.movedim(dim, 0).to(torch.int64)
    words = torch.zeros(values.shape[0] // per, *values.shape[1:], dtype=torch.int64)
    for j in range(per):
        words |= (values[j::per] & ((1 << bits) - 1)) << (j * bits)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as int32 holds them
    return words.to(torch.int32).movedim(0, dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 8])
def test_the_gptq_kernel_computes_each_row_alike_whatever_the_rows(device, bits):
    from onegpu.engine import invariant_kernels

    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    k, n, group = 256, 80, 128
    q = torch.randint(0, 2**bits, (k, n))
    zeros = torch.randint(0, 2**bits, (k // group, n))
    scales = torch.rand(k // group, n) * 0.02
    bias = torch.randn(n)
    weight = (q - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)  # [K, N]
    x = torch.randn(70, k)
    args = [t.to(device) for t in (pack(q, bits, 0), pack(zeros, bits, 1))]
    args += [scales.to(device, dtype), bias.to(device, dtype)]
    out = invariant_kernels.gptq(x.to(device, dtype), *args, bits=bits, group_size=group)
    torch.testing.assert_close(out.float().cpu(), x @ weight + bias, atol=2e-2, rtol=1e-2)
    for rows in (1, 3, 16, 64, 65):
        part = invariant_kernels.gptq(
            x[:rows].to(device, dtype), *args, bits=bits, group_size=group
        )
        assert torch.equal(part, out[:rows])


@pytest.mark.parametrize("device", DEVICES)
def test_the_dense_kernel_computes_each_row_alike_whatever_the_rows(device):
    from onegpu.engine import invariant_kernels

    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    linear = torch.nn.Linear(192, 100).to(device, dtype)
    x = torch.randn(70, 192, device=device, dtype=dtype)
    out = invariant_kernels.dense(x, linear.weight, linear.bias)
    torch.testing.assert_close(out, linear(x), atol=2e-2, rtol=1e-2)
    for rows in (1, 2, 33, 64, 69):
        assert torch.equal(
            invariant_kernels.dense(x[:rows], linear.weight, linear.bias), out[:rows]
        )


def test_a_loaded_gptq_layer_computes_the_same_through_the_invariant_kernel(tmp_path):
    pytest.importorskip("gptqmodel", reason="needs gptqmodel (make test installs it)")
    from onegpu.engine.invariant_kernels import InvariantGPTQ
    from tests.engine.test_fusion import load_gptq, tiny_gptq_source, write_gptq_checkpoint

    folder = write_gptq_checkpoint(tmp_path / "gptq", tiny_gptq_source(vocab_size=512))
    model = load_gptq(folder, "cpu")  # the torch kernel: GPTQ's packing, v2 zero points
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3)).half()
    with torch.no_grad():
        expected = layer(x).float()
        got = InvariantGPTQ(layer)(x).float()
    assert expected.abs().max() > 0.1
    # A zero point off by one (v1 read as v2) would move outputs by several percent.
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_the_log_softmax_kernel_scores_each_row_alike_whatever_the_rows(device):
    from onegpu.engine import invariant_kernels

    torch.manual_seed(0)
    logits = (torch.randn(6, 5000) * 8).to(device, torch.float16)
    logits[1, 7] = 60.0  # a peaked row, as real logits are
    out = invariant_kernels.log_softmax(logits)
    torch.testing.assert_close(out, torch.log_softmax(logits.float(), -1), atol=1e-5, rtol=1e-5)
    for rows in (1, 2, 5):
        assert torch.equal(invariant_kernels.log_softmax(logits[:rows]), out[:rows])
    assert torch.equal(invariant_kernels.log_softmax(logits[3:4])[0], out[3])
