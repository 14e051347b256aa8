"""How close the fused model answers to the model as loaded: the embedded SmolLM2, greedy.

    python bench/fusion_check.py                  # float16 and float32, on CUDA if present

For each dtype, loads the engine twice (`--no-fuse`, then the default), decodes the same prompts
greedily with top-5 logprobs, and prints how many answers have identical tokens and the largest
logprob difference over the tokens they share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import Future
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Question: What is 12 + 30?\nAnswer:",
    "Write a haiku about the sea.\n",
    "def fibonacci(n):\n",
    "The three primary colours are",
    "Translate to French: good morning\n",
    "Once upon a time, in a land far away,",
    "Summarize: The meeting was moved from Monday to Wednesday because the room was booked.\n",
]


def answers(engine, new_tokens: int) -> list[list[tuple[int, float]]]:
    from onegpu.engine.types import GenerationRequest

    futures = []
    for prompt in PROMPTS:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        request = GenerationRequest(
            prompt=prompt, max_new_tokens=new_tokens, temperature=0.0, top_k_per_token=5
        )
        engine.admit(request, future)
        futures.append(future)
    while engine.busy:
        engine.step()
    results = [f.result() for f in futures]
    return [list(zip(r.token_ids, (t.logprob for t in r.tokens), strict=False)) for r in results]


def compare(device: str, dtype: str, new_tokens: int) -> dict:
    from onegpu.engine.loading import EngineConfig, load_engine

    runs = []
    for fuse in (False, True):
        engine = load_engine(EngineConfig(device=device, dtype=dtype, fuse=fuse, default_stop=()))
        runs.append(answers(engine, new_tokens))
        del engine
    identical, worst = 0, 0.0
    for a, b in zip(*runs, strict=True):
        identical += [t for t, _ in a] == [t for t, _ in b]
        for (ta, la), (tb, lb) in zip(a, b, strict=False):
            if ta != tb:
                break
            worst = max(worst, abs(la - lb))
    return {"identical": identical, "answers": len(PROMPTS), "max_logprob_diff": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    result = {
        dtype: compare(args.device, dtype, args.new_tokens) for dtype in args.dtypes.split(",")
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fusion_check.json").write_text(json.dumps(result, indent=2))
    for dtype, r in result.items():
        print(
            f"fusion check, SmolLM2 on {args.device} in {dtype}: {r['identical']}/{r['answers']} "
            f"answers identical, max |logprob diff| {r['max_logprob_diff']:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
