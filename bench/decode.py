"""Single-stream decode speed of a Qwen-14B-shaped 8-bit GPTQ model, against the bandwidth bound.

    python bench/decode.py                       # prompts of 128 and 1,500 tokens, 64 new tokens
    python bench/decode.py --prompt-lengths 128 --new-tokens 128

Builds the checkpoint first (random packed weights in the exact Qwen-14B shape, as `onegpu quantize`
writes them; see train_14b.py), loads it the way `onegpu serve` does (Marlin kernels, GPU capped at
24 GiB), and times three things in one run on one GPU:
  - bandwidth: a large device-to-device copy (bytes read + written per second);
  - onegpu: the serving engine (`Engine.generate`, logprobs and stop checks included), one
    request alone, then 1, 2, 4, 8, 16 requests decoding together (aggregate tokens/s);
  - baseline: transformers `generate()`, greedy, one request, same model: what 2023 entries ran.
Decode tokens/s excludes the prefill and first token. bound = bandwidth / bytes read per token
(all weights except the embedding table, plus the KV cache of the context). Prints a table last and
writes decode.json to $OUT (or ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_14b import QWEN_14B, WORDS, build_checkpoint, make_tokenizer  # noqa: E402


def copy_bandwidth(gib: float = 4.0, iters: int = 20) -> float:
    """Bytes per second moved by a device-to-device copy (each byte read once, written once)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 * iters / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding table."""
    embed = model.get_input_embeddings().weight
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tensors.pop(id(embed), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes(shape: dict, context: int) -> int:
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 2
    return per_token * context


def prompt_of(tokenizer, n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_tokens)]
    ids = tokenizer(" ".join(words))["input_ids"][: n_tokens - 1]
    return tokenizer.decode(ids)


def time_engine(engine, prompt: str, new_tokens: int) -> dict:
    from onegpu.engine.types import GenerationRequest

    request = GenerationRequest(
        prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0
    )
    completion = engine.generate(request)
    decode_s = completion.seconds - completion.first_token_seconds
    return {
        "prompt_tokens": completion.prompt_tokens,
        "new_tokens": completion.new_tokens,
        "first_token_s": completion.first_token_seconds,
        "decode_tok_s": (completion.new_tokens - 1) / decode_s,
    }


def time_batch(engine, prompt: str, rows: int, new_tokens: int) -> dict:
    """`rows` requests decoding together: aggregate tokens/s over decode-only steps."""
    from concurrent.futures import Future

    from onegpu.engine.types import GenerationRequest

    futures = []
    for i in range(rows):
        request = GenerationRequest(
            prompt=f"{i} {prompt}",
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            temperature=0.0,
        )
        future: Future = Future()
        future.set_running_or_notify_cancel()
        engine.admit(request, future)
        futures.append(future)
    scheduler = engine.scheduler
    # Prefill first (packed); time only steps where every row decodes.
    while len(scheduler.running) < rows or any(s.prefilling for s in scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    steps = new_tokens // 2
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    while engine.busy:
        engine.step()
    return {"rows": rows, "step_ms": 1e3 * seconds / steps, "decode_tok_s": rows * steps / seconds}


def time_baseline(engine, prompt: str, new_tokens: int) -> dict:
    """transformers generate(), greedy, one request: decode rate from two lengths' difference."""
    ids = torch.tensor([engine.tokenize(prompt)], device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    short, full = run(1), run(new_tokens)
    return {"first_token_s": short, "decode_tok_s": (new_tokens - 1) / (full - short)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lengths", default="128,1500")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,2,4,8,16", help="rows decoding together")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers generate()")
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    from onegpu.engine.loading import EngineConfig, load_engine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(), "new_tokens": args.new_tokens}
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_gb_s"] = bandwidth / 1e9

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as work:
        start = time.perf_counter()
        folder = build_checkpoint(Path(work) / "qwen14b-gptq8", QWEN_14B, make_tokenizer(WORDS))
        result["checkpoint_write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        engine = load_engine(
            EngineConfig(
                model=str(folder),
                device="cuda",
                dtype="float16",
                gpu_memory_gib=args.gpu_memory_gib,
                default_stop=(),
            )
        )
        result["load_s"] = time.perf_counter() - start
        result["weight_bytes"] = weight_bytes(engine.model)
        time_engine(engine, prompt_of(engine.tokenizer, 32, seed=99), 4)  # warm-up
        rows = []
        for length in (int(x) for x in args.prompt_lengths.split(",")):
            prompt = prompt_of(engine.tokenizer, length, seed=length)
            ours = time_engine(engine, prompt, args.new_tokens)
            batches = [
                time_batch(engine, prompt, int(n), args.new_tokens) for n in args.batches.split(",")
            ]
            base = (
                {"decode_tok_s": float("nan")}
                if args.no_baseline
                else time_baseline(engine, prompt, args.new_tokens)
            )
            per_token = result["weight_bytes"] + kv_bytes(QWEN_14B, ours["prompt_tokens"])
            bound = bandwidth / per_token
            rows.append(
                {
                    "prompt_tokens": ours["prompt_tokens"],
                    "bound_tok_s": bound,
                    "onegpu": ours,
                    "onegpu_batches": batches,
                    "baseline_generate": base,
                    "onegpu_of_bound": ours["decode_tok_s"] / bound,
                    "baseline_of_bound": base["decode_tok_s"] / bound,
                    "onegpu_over_baseline": ours["decode_tok_s"] / base["decode_tok_s"],
                }
            )
        result["rows"] = rows
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30

    (out / "decode.json").write_text(json.dumps(result, indent=2))
    print(
        f"\n{result['gpu']}: copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s, "
        f"weights read per token {result['weight_bytes'] / 1e9:.2f} GB, "
        f"load {result['load_s']:.0f} s, peak {result['peak_gpu_gib']:.1f} GiB"
    )
    print(
        f"{'prompt':>7} {'bound':>7} {'onegpu':>7} {'of bound':>8} "
        f"{'generate':>8} {'of bound':>8} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['prompt_tokens']:>7} {r['bound_tok_s']:>7.1f} {r['onegpu']['decode_tok_s']:>7.1f} "
            f"{r['onegpu_of_bound']:>8.2f} {r['baseline_generate']['decode_tok_s']:>8.1f} "
            f"{r['baseline_of_bound']:>8.2f} {r['onegpu_over_baseline']:>6.2f}"
        )
        one = r["onegpu_batches"][0]["decode_tok_s"]
        print(
            "  rows together: "
            + ", ".join(
                f"{b['rows']}: {b['decode_tok_s']:.0f} tok/s ({b['decode_tok_s'] / one:.1f}x, "
                f"{b['step_ms']:.1f} ms/step)"
                for b in r["onegpu_batches"]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
