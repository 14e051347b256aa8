"""dense_prefill.py: Marlin's tile order read from a repack, the dequantizing kernel, and large
passes on cuBLAS giving Marlin's results.

On the CPU a stand-in repack (`fake_marlin`: a random order within each tile) plays Marlin's,
and the kernel runs in Triton's interpreter; on CUDA the layers are GPTQModel's Marlin ones.
"""

from __future__ import annotations

import pytest
import torch

from onegpu.engine.dense_prefill import (
    TILE_BYTES,
    TILE_K,
    TILE_N,
    Layout,
    dequantize,
    gptq_pack,
    install,
    read_layout,
    word_bytes,
)
from tests.conftest import tiny_qwen2
from tests.engine.test_fusion import load_gptq, tiny_gptq_source, write_gptq_checkpoint


def fake_marlin(packed: torch.Tensor, k: int, n: int, byte_of: torch.Tensor) -> torch.Tensor:
    """GPTQ-packed [k/4, n] int32 laid out as a Marlin-like repack: tile (r, u) in int32
    256u.. of row r, weight (i, j) of the tile at byte byte_of[i, j]."""
    codes = word_bytes(packed.T.contiguous()).view(n, k).T  # [k, n]
    tiles = codes.reshape(k // TILE_K, TILE_K, n // TILE_N, TILE_N).permute(0, 2, 1, 3)
    out = torch.empty(k // TILE_K, n // TILE_N, TILE_BYTES, dtype=torch.int64)
    out[:, :, byte_of.flatten().long()] = tiles.reshape(k // TILE_K, n // TILE_N, -1)
    return gptq_pack(out.reshape(k // TILE_K, -1).T).T.contiguous()  # 4 bytes per int32


def fake_scales(order: torch.Tensor):
    """A scale permutation within each 64 columns: stored column c holds column order[c]."""

    def permute(scales, k, n):
        return scales.reshape(-1, TILE_N)[:, order].reshape(-1, n)

    return permute


def random_layout(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(TILE_BYTES, generator=gen), torch.randperm(TILE_N, generator=gen)


def test_gptq_pack_puts_row_k_in_byte_k_mod_4():
    codes = torch.tensor([[1, 255], [2, 0], [3, 7], [4, 128]])
    packed = gptq_pack(codes)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert word_bytes(packed.T.contiguous()).tolist() == [[1, 2, 3, 4], [255, 0, 7, 128]]


@pytest.mark.parametrize("seed", [0, 1])
def test_read_layout_finds_the_tile_order(seed):
    byte_of, order = random_layout(seed)
    layout = read_layout(
        lambda p, k, n: fake_marlin(p, k, n, byte_of.view(TILE_K, TILE_N)),
        fake_scales(order),
        torch.device("cpu"),
    )
    assert isinstance(layout, Layout)
    assert layout.byte_of.flatten().tolist() == byte_of.tolist()
    assert order[layout.scale_of.long()].tolist() == list(range(TILE_N))


def test_read_layout_takes_gptqmodels_scale_orders():
    marlin = pytest.importorskip("gptqmodel.utils.marlin", reason="needs gptqmodel")
    byte_of, _ = random_layout(0)

    def repack(p, k, n):
        return fake_marlin(p, k, n, byte_of.view(TILE_K, TILE_N))

    for group in (TILE_K, -1):  # grouped and per-channel scales are ordered differently
        layout = read_layout(
            repack, lambda s, k, n, g=group: marlin.marlin_permute_scales(s, k, n, g), "cpu"
        )
        scales = torch.arange(2 * TILE_N, dtype=torch.float32)[None]
        stored = marlin.marlin_permute_scales(scales, 2 * TILE_K, 2 * TILE_N, group)
        assert stored[0, layout.scale_of.long()].tolist() == list(range(TILE_N))


def _swap_tiles(p, k, n, byte_of):
    out = fake_marlin(p, k, n, byte_of)
    return torch.cat([out[:, 256:512], out[:, :256], out[:, 512:]], dim=1)


@pytest.mark.parametrize(
    "repack, problem",
    [
        (lambda p, k, n, b: fake_marlin(p, k, n, b) ^ 0x80, "other tiles"),  # codes changed
        (lambda p, k, n, b: fake_marlin(p, k, n, b)[:, : 2 * n], "repacked to"),
        (_swap_tiles, "other tiles"),
        (lambda p, k, n, b: fake_marlin(p, k, n, b) & ~0xFF, "twice"),  # a byte lost
    ],
)
def test_read_layout_refuses_what_it_cannot_read(repack, problem):
    byte_of, order = random_layout(0)
    layout = read_layout(
        lambda p, k, n: repack(p, k, n, byte_of.view(TILE_K, TILE_N)), fake_scales(order), "cpu"
    )
    assert isinstance(layout, str) and problem in layout


def test_read_layout_refuses_tiles_ordered_unlike_one_another():
    first, _ = random_layout(0)
    second, order = random_layout(1)

    def repack(p, k, n):  # the second tile row in another order
        top = fake_marlin(p, k, n, first.view(TILE_K, TILE_N))
        bottom = fake_marlin(p, k, n, second.view(TILE_K, TILE_N))
        return torch.cat([top[:1], bottom[1:]])

    assert "differently" in read_layout(repack, fake_scales(order), "cpu")


@pytest.mark.parametrize("group", [32, -1])
@pytest.mark.parametrize("columns", [4 * TILE_N, 3 * TILE_N])  # 4 tiles per program, or 1
def test_dequantize_reads_the_layout_it_is_given(group, columns):
    gen = torch.Generator().manual_seed(3)
    rows = 64
    byte_of, order = random_layout(2)
    codes = torch.randint(0, 256, (rows, columns), generator=gen)
    groups = rows // group if group > 0 else 1
    scales = (torch.rand(groups, columns, generator=gen) + 0.5).half()
    layout = read_layout(
        lambda p, k, n: fake_marlin(p, k, n, byte_of.view(TILE_K, TILE_N)),
        fake_scales(order),
        "cpu",
    )
    qweight = fake_marlin(gptq_pack(codes), rows, columns, byte_of.view(TILE_K, TILE_N))
    out = torch.empty(rows, columns, dtype=torch.float16)
    dequantize(qweight, fake_scales(order)(scales, rows, columns), layout, group, out)
    per_row = scales.float().repeat_interleave(rows // groups, dim=0)
    torch.testing.assert_close(out, ((codes - 128) * per_row).half(), rtol=0, atol=0)


def test_dequantize_refuses_a_qweight_of_another_shape():
    layout = Layout(torch.zeros(TILE_K, TILE_N, dtype=torch.int32), torch.zeros(64).int())
    with pytest.raises(ValueError, match="Marlin qweight"):
        dequantize(
            torch.zeros(2, 4 * 64, dtype=torch.int32),
            torch.ones(1, 64).half(),
            layout,
            -1,
            torch.empty(48, 64, dtype=torch.float16),
        )


def test_nothing_is_installed_without_marlin_layers():
    model = tiny_qwen2(vocab_size=64)
    assert install(model) is None
    assert all(not hasattr(m, "onegpu_dense") for m in model.modules())


# -- on the GPU: GPTQModel's Marlin ---------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_large_passes_on_dequantized_weights_give_marlins_logits(tmp_path):
    pytest.importorskip("gptqmodel", reason="needs gptqmodel (make test installs it)")
    from onegpu.engine.fusion import fuse

    folder = write_gptq_checkpoint(tmp_path / "gptq", tiny_gptq_source(vocab_size=512))
    model = load_gptq(folder, "cuda")
    fuse(model, checkpoint=folder)  # q/k/v carry a bias: Marlin orders it its own way
    dense = install(model)
    assert dense is not None
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.onegpu_bias is not None
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        dense.min_rows = 10**9
        marlin = model(ids).logits.float()
        dense.min_rows = 256
        cublas = model(ids).logits.float()
        calls = []
        layer.onegpu_dense.weight = lambda m, w=dense.weight: calls.append(m) or w(m)
        model(ids[:, :255])  # a pass under min_rows: Marlin's
        assert calls == []
        model(ids)
        assert calls
    scale = marlin.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(cublas, marlin, rtol=0, atol=1e-2 * scale)
