"""The decode kernels compile for an H100 (sm_90) on any machine. Triton's interpreter, which
runs the kernel tests without a GPU, accepts programs its compiler refuses: a decode kernel
whose variable changed shape inside an `if` passed every CPU test and failed every CUDA decode.

The compiler runs in a child process: under the interpreter (set for the whole test session on
a machine without a GPU) Triton's own library functions are interpreted too.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # not from conftest: it would set the interpreter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def argument_type(name: str, kv: str) -> str:
    """A decode kernel's argument `name` as Triton's signature names it."""
    if name in ("K", "V"):
        return kv
    if name in ("Q", "OUT"):
        return "*fp16"
    if name in ("TABLES", "LENGTHS"):
        return "*i32"
    if name in ("KS", "VS", "ACC", "MAX", "SUM"):
        return "*fp32"
    return "fp32" if name == "scale" else "i32"  # strides


def compile_decode(name: str, quant: bool, dim: int, split: int) -> str:
    """The PTX for sm_90 of decode kernel `name` with these constants (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from onegpu.engine import kernels

    kernel = getattr(kernels, name)
    constants = {
        "GROUP": 5,
        "BLOCK": 16,
        "D": dim,
        "DP": triton.next_power_of_2(dim),
        "SPLIT": split,
        "SP": 8,
        "PER": kernels.BLOCKS_PER_STEP,
        "QUANT": quant,
    }
    constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
    kv = "*i8" if quant else "*fp16"
    signature = {
        name: "constexpr" if name in constants else argument_type(name, kv)
        for name in kernel.arg_names
    }
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize("name", ["_decode_split", "_decode_merge"])
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize(("dim", "split"), [(128, 4), (24, 16)])
def test_the_decode_kernels_compile_for_sm90(name, quant, dim, split):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tests.engine.test_kernel_compile", name, str(quant)]
    done = subprocess.run(
        [*command, str(dim), str(split)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f".entry {name}" in done.stdout


if __name__ == "__main__":
    name, quant, dim, split = sys.argv[1], sys.argv[2] == "True", int(sys.argv[3]), int(sys.argv[4])
    print(compile_decode(name, quant, dim, split))
