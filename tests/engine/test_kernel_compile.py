"""Every Triton kernel of the engine compiles for an H100 (sm_90) on any machine.

Triton's interpreter, which runs the kernel tests without a GPU, accepts programs its compiler
refuses: a decode kernel whose variable changed shape inside an `if` passed every CPU test and
failed every CUDA decode. So the CPU kernel tests run once more in a child process that records
each launch (`launch_recorder`), and each distinct launch is compiled in another child, without
the interpreter (under it, Triton's own library functions are interpreted too).
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # not from conftest: it would set the interpreter
KERNELS = {
    "onegpu.engine.kernels": ["_decode", "_prefill", "_rope_write"],
    "onegpu.engine.dense_prefill": ["_dequantize"],
    "onegpu.engine.invariant_kernels": ["_matmul", "_log_softmax"],
    "onegpu.engine.mlp_kernels": ["_silu_mul"],
}
# The CPU tests that launch them (in the interpreter).
LAUNCHING = [
    "tests/engine/test_attention.py::test_triton_kernels_equal_the_reference",
    "tests/engine/test_attention.py::test_the_rotary_store_kernel_passes_its_own_check",
    "tests/engine/test_dense_prefill.py::test_dequantize_reads_the_layout_it_is_given",
    "tests/engine/test_invariant.py::test_the_gptq_kernel_computes_each_row_alike_whatever_the_rows",
    "tests/engine/test_invariant.py::test_the_dense_kernel_computes_each_row_alike_whatever_the_rows",
    "tests/engine/test_invariant.py::test_the_log_softmax_kernel_scores_each_row_alike_whatever_the_rows",
    "tests/engine/test_mlp_kernels.py::test_silu_mul_computes_the_eager_arithmetic",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]


def compile_launches(path: Path) -> None:
    """Compile each launch recorded in `path` for sm_90; print each kernel compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for module, name, signature, constants in json.loads(path.read_text()):
        kernel = getattr(importlib.import_module(module), name)
        names = kernel.arg_names
        source = ASTSource(
            fn=kernel,
            signature=signature,
            constexprs={(names.index(key),): value for key, value in constants.items()},
        )
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        print(f"compiled {module}.{name}")


def test_every_kernel_the_cpu_tests_launch_compiles_for_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    env = os.environ | {"ONEGPU_LAUNCHES": str(launches), "TRITON_INTERPRET": "1"}
    recorded = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "tests.engine.launch_recorder", "-m", "not cuda", *LAUNCHING],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    seen = {(module, name) for module, name, _, _ in json.loads(launches.read_text())}
    assert seen == {(module, name) for module, names in KERNELS.items() for name in names}

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tests.engine.test_kernel_compile", str(launches)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled ") == len(json.loads(launches.read_text()))


if __name__ == "__main__":
    compile_launches(Path(sys.argv[1]))
