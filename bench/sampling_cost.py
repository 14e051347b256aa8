"""What choosing sampled tokens costs: `sampling.gumbel` and `sampling.pick` on random logits.

    python bench/sampling_cost.py                       # 9 rows (HELM's summaries), CPU
    python bench/sampling_cost.py --rows 1,9,16 --vocab 49152,151936 --device cuda

Milliseconds per call (the median of --repeats timed calls after one warm-up), for each row count
and vocabulary size: the Gumbel noise alone, and a whole sampled pick at temperature 0.3 (warp,
noise, argmax). On a GPU each call is synchronized before the clock stops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from onegpu.engine.sampling import gumbel, pick


def median_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="9", help="sampled rows per call")
    parser.add_argument("--vocab", default="49152,151936", help="SmolLM2's and Qwen's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device=device)
    print(f"{'rows':>5} {'vocab':>7} {'gumbel ms':>10} {'pick ms':>8}  ({device})")
    for vocab in (int(v) for v in args.vocab.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            logits = torch.randn(rows, vocab, device=device)
            draws = [(seed, 5) for seed in range(rows)]
            noise = median_ms(partial(gumbel, draws, vocab, generator), device, args.repeats)
            sampled = partial(pick, logits, temperature=0.3, top_k=0, top_p=1.0, draws=draws)
            picked = median_ms(partial(sampled, generator=generator), device, args.repeats)
            print(f"{rows:>5} {vocab:>7} {noise:>10.2f} {picked:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
