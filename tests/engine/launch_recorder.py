"""A pytest plugin for `test_kernel_compile`'s child run: records each Triton kernel launch the
interpreter runs (the kernel, its argument types, its constexpr values) and writes the distinct
ones as JSON to the file named by ONEGPU_LAUNCHES when the session ends."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from triton.runtime.interpreter import InterpretedFunction

TENSOR_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}
_LAUNCHES: set[str] = set()
_run = InterpretedFunction.run


def argument_type(value) -> str:
    """Triton's signature type for a runtime (not constexpr) argument."""
    if isinstance(value, torch.Tensor):
        return TENSOR_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _recording_run(self, *args, grid, warmup, **kwargs):
    given = dict(zip(self.arg_names, args, strict=False)) | kwargs
    parameters = inspect.signature(self.fn).parameters
    signature, constants = {}, {}
    for name in self.arg_names:
        if "constexpr" in str(parameters[name].annotation):
            signature[name], constants[name] = "constexpr", given[name]
        else:
            signature[name] = argument_type(given[name])
    record = [self.fn.__module__, self.fn.__name__, signature, constants]
    _LAUNCHES.add(json.dumps(record, sort_keys=True, default=str))
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)


InterpretedFunction.run = _recording_run


def pytest_sessionfinish(session, exitstatus):
    launches = [json.loads(line) for line in sorted(_LAUNCHES)]
    Path(os.environ["ONEGPU_LAUNCHES"]).write_text(json.dumps(launches, indent=1))
