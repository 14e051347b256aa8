"""The challenge's request mix from 30 concurrent clients, against the baseline 2023 entries ran.

    python bench/helm_mix.py                                  # 14B-shaped 8-bit model, on CUDA
    python bench/helm_mix.py --shape tiny --device cpu --cycles 1 --baseline-cycles 1  # self-check

One process, one GPU, one loaded checkpoint (random 8-bit GPTQ weights in the exact Qwen-14B
shape, built first, loaded as `onegpu serve` loads it: Marlin, GPU capped at 24 GiB):
  1. onegpu: the app on a real uvicorn on loopback, `--clients` threads posting the mix over HTTP;
  2. baseline: transformers `generate()` on the same model, one request at a time (greedy or
     sampled, stop strings, scores for logprobs): what the 2023 entries ran.
The mix repeats in cycles of 20 requests, interleaved so any whole cycle is representative:
  - 10 multiple-choice: 1 token, top 5 logprobs, few-shot prompts (500-1,800 tokens) that share
    their examples within each of 3 scenarios, as HELM's in-context examples do;
  - 4 BIG-bench-like: 64 tokens, no stop;
  - 3 GSM-like: up to 400 tokens, stop "\\n\\n";
  - 3 summaries: up to 128 tokens at temperature 0.3 (seeded).
Both sides run whole cycles (the baseline fewer: it is slow). Prints a table last and writes
helm_mix.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from load import HELM_DEFAULTS  # noqa: E402
from train_14b import QWEN_14B, TINY, WORDS, build_checkpoint, make_tokenizer  # noqa: E402

SCENARIOS = 3
SHAPES = {"qwen14b": QWEN_14B, "tiny": TINY}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def few_shot_block(scenario: int, n_tokens: int) -> str:
    """A scenario's in-context examples: the same text for every instance of that scenario."""
    rng = random.Random(1000 + scenario)
    examples = []
    while sum(len(e.split()) for e in examples) < n_tokens:
        examples.append(
            f"Question: {words(rng, 40)}?\nA. {words(rng, 3)}\nB. {words(rng, 3)}\n"
            f"C. {words(rng, 3)}\nD. {words(rng, 3)}\nAnswer: {rng.choice('ABCD')}\n\n"
        )
    return "".join(examples)


def mix(cycles: int, scale: float) -> list[dict]:
    """`cycles` x 20 request bodies, as HELM sends them, interleaved by kind."""
    rng = random.Random(0)
    base = HELM_DEFAULTS
    # Few-shot blocks of about 470, 940 and 1,690 tokens (1.25 tokens per word here), so the
    # prompts span 500-1,800 tokens with their question.
    blocks = [few_shot_block(s, int(n * scale)) for s, n in enumerate((380, 750, 1350))]
    out = []
    for c in range(cycles):
        kinds = ["mc"] * 10 + ["bigbench"] * 4 + ["gsm"] * 3 + ["summary"] * 3
        random.Random(c).shuffle(kinds)
        for i, kind in enumerate(kinds):
            q = words(rng, int(40 * scale) + 1)
            if kind == "mc":
                prompt = f"{blocks[i % SCENARIOS]}Question: {q}?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
                body = {**base, "prompt": prompt, "max_new_tokens": 1, "top_k_per_token": 5}
            elif kind == "bigbench":
                body = {
                    **base,
                    "prompt": f"{words(rng, int(300 * scale))}\n{q}",
                    "max_new_tokens": 64,
                }
            elif kind == "gsm":
                prompt = f"{words(rng, int(900 * scale))}\nQ: {q}\nA:"
                body = {**base, "prompt": prompt, "max_new_tokens": 400, "stop_sequences": ["\n\n"]}
            else:
                prompt = f"Article: {words(rng, int(800 * scale))}\n\nSummarize the above article:"
                body = {
                    **base,
                    "prompt": prompt,
                    "max_new_tokens": 128,
                    "temperature": 0.3,
                    "seed": c * 100 + i,
                }
            out.append({"kind": kind, "body": body})
    return out


class PeakMemory:
    """The allocator's peak GPU memory over the block (0 on the CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *_):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()


def summarize(latencies: list[float], tokens: int, seconds: float, failures: int) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "failures": failures,
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "generated_tokens_per_s": tokens / seconds,
        "p50_s": statistics.median(ordered) if ordered else None,
        "p95_s": ordered[int(0.95 * (len(ordered) - 1))] if ordered else None,
    }


def run_onegpu(engine, requests: list[dict], clients: int) -> dict:
    import httpx

    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings
    from tests.live import live_server

    app = create_app(ServeSettings(), engine=engine)
    latencies: list[float] = []
    tokens = 0
    failures: list[str] = []
    lock = threading.Lock()
    with live_server(app) as url, httpx.Client(base_url=url, timeout=3600) as client:

        def post(item: dict) -> None:
            nonlocal tokens
            start = time.perf_counter()
            response = client.post("/process", json=item["body"])
            elapsed = time.perf_counter() - start
            with lock:
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                latencies.append(elapsed)
                tokens += len(response.json()["tokens"])

        client.post("/process", json={"prompt": "warm up", "max_new_tokens": 2})
        with PeakMemory(engine.info.device) as memory:
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(post, requests))
            seconds = time.perf_counter() - start
    result = summarize(latencies, tokens, seconds, len(failures))
    result |= {
        "clients": clients,
        "peak_gpu_gib": memory.peak / 2**30,
        "failure_samples": failures[:5],
        "slots": engine.cache.slots,
        "reused_prompt_tokens": engine.reused_tokens,
        "kv_cache_gib": engine.cache.nbytes() / 2**30,
    }
    return result


def run_baseline(engine, requests: list[dict]) -> dict:
    """transformers generate(), one request at a time, with what HELM needs from each answer."""
    model, tokenizer = engine.model, engine.tokenizer
    latencies: list[float] = []
    tokens = 0
    with PeakMemory(engine.info.device) as memory:
        start = time.perf_counter()
        for item in requests:
            body = item["body"]
            began = time.perf_counter()
            ids = torch.tensor([engine.tokenize(body["prompt"])], device=engine.device)
            sample = body["temperature"] > 1e-5
            if sample:
                torch.manual_seed(body.get("seed", 0))
            out = model.generate(
                ids,
                max_new_tokens=body["max_new_tokens"],
                do_sample=sample,
                temperature=body["temperature"] if sample else None,
                top_k=None,
                top_p=None,
                stop_strings=body["stop_sequences"] or None,
                tokenizer=tokenizer,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.eos_token_id,
            )
            new = out.sequences[0, ids.shape[1] :]
            logprobs = [
                torch.log_softmax(score[0].float(), -1).topk(body["top_k_per_token"])
                for score in out.scores
            ]
            tokenizer.decode(new, skip_special_tokens=True)
            tokens += len(logprobs)
            latencies.append(time.perf_counter() - began)
        seconds = time.perf_counter() - start
    return summarize(latencies, tokens, seconds, 0) | {"peak_gpu_gib": memory.peak / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen14b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cycles", type=int, default=3, help="20-request cycles for onegpu")
    parser.add_argument("--baseline-cycles", type=int, default=1)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument(
        "--checkpoint", help="build the checkpoint here and keep it (default: temp)"
    )
    args = parser.parse_args()
    from onegpu.engine.loading import EngineConfig, load_engine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.shape == "tiny"
    scale = 0.1 if tiny else 1.0
    result: dict = {"shape": args.shape, "device": args.device, "clients": args.clients}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as work:
        work = args.checkpoint or work
        start = time.perf_counter()
        tokenizer = make_tokenizer(WORDS)
        shape = dict(SHAPES[args.shape])
        shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))  # tiny + the Qwen tokenizer
        folder = build_checkpoint(Path(work) / "gptq8", shape, tokenizer)
        result["checkpoint_write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        engine = load_engine(
            EngineConfig(
                model=str(folder),
                device=args.device,
                dtype="float16" if args.device.startswith("cuda") else "float32",
                gpu_memory_gib=args.gpu_memory_gib,
            )
        )
        result["load_s"] = time.perf_counter() - start
        requests = mix(args.cycles, scale)
        prompt_tokens = [len(engine.tokenize(r["body"]["prompt"])) for r in requests]
        result["prompt_tokens"] = {"min": min(prompt_tokens), "max": max(prompt_tokens)}
        result["onegpu"] = run_onegpu(engine, requests, args.clients)
        result["onegpu"]["cycles"] = args.cycles
        result["baseline"] = run_baseline(engine, requests[: 20 * args.baseline_cycles])
        result["baseline"]["cycles"] = args.baseline_cycles
    ours, base = result["onegpu"], result["baseline"]
    result["requests_per_s_ratio"] = ours["requests_per_s"] / base["requests_per_s"]
    result["tokens_per_s_ratio"] = ours["generated_tokens_per_s"] / base["generated_tokens_per_s"]
    (out / "helm_mix.json").write_text(json.dumps(result, indent=2))

    print(
        f"\nhelm-mix, {args.shape} on {result.get('gpu', args.device)}; prompts "
        f"{result['prompt_tokens']['min']}-{result['prompt_tokens']['max']} tokens; load "
        f"{result['load_s']:.0f} s; {ours['slots']} KV rows; "
        f"{ours['reused_prompt_tokens']} prompt tokens reused"
    )
    print(
        f"{'':>10} {'req':>5} {'fail':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} "
        f"{'peak GiB':>8}"
    )
    for name, r in (("onegpu", ours), ("generate()", base)):
        print(
            f"{name:>10} {r['requests']:>5} {r['failures']:>4} {r['requests_per_s']:>7.2f} "
            f"{r['generated_tokens_per_s']:>7.1f} {r['p50_s']:>7.2f} {r['p95_s']:>7.2f} "
            f"{r['peak_gpu_gib']:>8.2f}"
        )
    print(
        f"ratio: requests/s {result['requests_per_s_ratio']:.2f}x, "
        f"generated tokens/s {result['tokens_per_s_ratio']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
