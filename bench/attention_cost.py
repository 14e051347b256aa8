"""Decode attention alone on the 14B shape: microseconds per layer's call, replayed from a CUDA
graph of 40 calls (one per layer, as the decode step's graph has them), for the kernels of
whichever onegpu is on the path. No model, no Marlin: a fresh GPU machine runs it in seconds.

    python bench/attention_cost.py --out $OUT
    PYTHONPATH=.prev/src:$PYTHONPATH python bench/attention_cost.py --label prev --out $OUT

Rows of `--contexts` positions each (batch 1 at 128 and 512 positions; 10 rows at 1,000: a
GSM-shaped batch), 40 query and key/value heads of 128, fp16, blocks of 16, block tables as wide
as the engine's (2,048-token window plus a 4-token draft).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import onegpu
from onegpu.engine import kernels
from onegpu.engine.kvcache import Layer

HEADS, DIM, BLOCK, LAYERS = 40, 128, 16, 40
WIDTH = -(-(2048 + 4) // BLOCK)  # table columns


def time_decode(rows: int, context: int, repeats: int) -> float:
    """Microseconds per decode-attention call over `rows` rows of `context` positions."""
    blocks = rows * -(-context // BLOCK) + 1
    make = lambda: torch.randn(blocks, BLOCK, HEADS, DIM, device="cuda", dtype=torch.float16)  # noqa: E731
    layer = Layer(make(), make())
    tables = torch.zeros(rows, WIDTH, dtype=torch.int32, device="cuda")
    per_row = -(-context // BLOCK)
    for r in range(rows):
        tables[r, :per_row] = torch.arange(1 + r * per_row, 1 + (r + 1) * per_row)
    lengths = torch.full((rows,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(rows, HEADS, DIM, device="cuda", dtype=torch.float16)
    kernels.decode(q, layer, tables, lengths, DIM**-0.5)  # compile, and any lazy buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            kernels.decode(q, layer, tables, lengths, DIM**-0.5)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (repeats * LAYERS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1x128,1x512,10x1000", help="ROWSxPOSITIONS,...")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--label", default="this")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU")
        return 0
    result = {
        "label": args.label,
        "gpu": torch.cuda.get_device_name(),
        "onegpu_source": str(Path(onegpu.__file__).parent),
        "us_per_call": {},
    }
    for spec in args.contexts.split(","):
        rows, context = (int(x) for x in spec.split("x"))
        us = time_decode(rows, context, args.repeats)
        result["us_per_call"][spec] = us
        print(f"attention [{args.label}] {rows} rows x {context} positions: {us:.2f} us per call")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention_cost.{args.label}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
