"""mlp_kernels.silu_mul against the eager arithmetic, on every device (Triton's interpreter on a
CPU): widths below, at and past one program's columns, padded and strided rows, every dtype."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICES

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Liger's arithmetic: the gate's SiLU in float32, rounded, times `up` in the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate.float()).to(gate_up.dtype) * up


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "pad"),
    [
        ((1, 2 * 5), 0),  # fewer columns than a program's
        ((3, 2 * 1024), 0),  # exactly one program per row
        ((2, 2 * 1500), 0),  # a second, partial program
        ((1, 2 * 13696), 0),  # one decode row of Qwen-14B's MLP
        ((17, 2 * 40), 24),  # rows further apart than their width (a slice of a wider tensor)
        ((2, 3, 2 * 64), 0),  # [batch, positions, 2F]
        ((0, 2 * 64), 0),  # no rows
    ],
)
def test_silu_mul_computes_the_eager_arithmetic(device, dtype, shape, pad):
    from onegpu.engine.mlp_kernels import silu_mul

    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter reads bfloat16 as NaN (numpy has no bfloat16)")
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(*shape[:-1], shape[-1] + pad, generator=gen) * 4
    gate_up = wide.to(dtype=dtype, device=device)[..., : shape[-1]]
    got = silu_mul(gate_up)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    # float32 SiLU may differ in its last bit (Triton's sigmoid against torch's): one rounding
    # of the product in the dtype.
    tolerance = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(got, reference(gate_up), rtol=tolerance, atol=tolerance)


def test_an_odd_gate_up_width_is_refused():
    from onegpu.engine.mlp_kernels import silu_mul

    with pytest.raises(ValueError, match="odd width 7"):
        silu_mul(torch.zeros(2, 7))
