"""What int8 KV changes: logprobs and greedy answers against the model's own dtype, and capacity.

    python bench/kv_dtype.py                  # the embedded SmolLM2-135M and a tiny Qwen2, on CPU
    python bench/kv_dtype.py --device cuda

Runs the same HELM-shaped requests (few-shot multiple choice with top-5 logprobs, greedy
answers of 32 tokens, an echoed paragraph) through two engines over one loaded model, one with
`kv_dtype="auto"` (keys and values in the model's dtype) and one with `"int8"`, each request
alone. Reports per model: requests whose greedy tokens are identical, the largest and mean
logprob difference over tokens both produced, and bytes per cached position (and what that
means for Qwen-14B on a 24 GiB card). Prints a table; writes kv_dtype.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FEW_SHOT = "".join(
    f"Question: What is {a} plus {b}?\nA. {a + b}\nB. {a + b + 2}\nC. {a * b}\nD. {a}\n"
    f"Answer: A\n\n"
    for a, b in [(2, 3), (7, 5), (11, 4), (6, 9)]
)
PROMPTS = [
    FEW_SHOT + "Question: What is 8 plus 6?\nA. 15\nB. 14\nC. 48\nD. 8\nAnswer:",
    FEW_SHOT + "Question: What is 3 plus 12?\nA. 15\nB. 36\nC. 17\nD. 3\nAnswer:",
    "The capital of France is",
    "Robert Boulter is an English film, television and theatre actor. He had a guest-starring "
    "role on the television series The Bill in 2000. This was followed by a starring role in",
    "Q: A farmer has 12 cows and buys 5 more. How many cows does he have?\nA:",
    "Translate to French: The cat sits on the mat.\nFrench:",
]


def requests():
    from onegpu.engine.types import GenerationRequest

    out = []
    for prompt in PROMPTS:
        out.append(
            GenerationRequest(prompt=prompt, max_new_tokens=1, temperature=0, top_k_per_token=5)
        )
        out.append(GenerationRequest(prompt=prompt, max_new_tokens=32, temperature=0))
    out.append(
        GenerationRequest(prompt=PROMPTS[3], max_new_tokens=0, echo_prompt=True, temperature=0)
    )
    return out


def compare(model, tokenizer, info, label: str) -> dict:
    from onegpu.engine.config import EngineConfig
    from onegpu.engine.generate import Engine
    from onegpu.engine.kvcache import bytes_per_token

    engines = {
        dtype: Engine(
            model,
            tokenizer,
            EngineConfig(kv_cache_dtype=dtype, default_stop=(), max_context=info.max_context),
            info=info,
            num_blocks=4 * 128 + 1,
        )
        for dtype in ("auto", "int8")
    }
    same, diffs = 0, []
    items = requests()
    for request in items:
        plain = engines["auto"].generate(request)
        quantized = engines["int8"].generate(request)
        same += plain.token_ids == quantized.token_ids
        for a, b in zip(plain.tokens, quantized.tokens, strict=False):
            if a.text != b.text:
                break
            diffs.append(abs(a.logprob - b.logprob))
    dtype = next(model.parameters()).dtype
    return {
        "model": label,
        "dtype": str(dtype).removeprefix("torch."),
        "requests": len(items),
        "same_greedy_tokens": same,
        "tokens_compared": len(diffs),
        "max_logprob_diff": max(diffs),
        "mean_logprob_diff": statistics.mean(diffs),
        "bytes_per_position": {
            kv: bytes_per_token(model.config, dtype, kv) for kv in ("auto", "int8")
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    from transformers import AutoConfig

    from onegpu.engine.kvcache import bytes_per_token
    from onegpu.engine.loading import EngineConfig, load_engine
    from onegpu.engine.types import ModelInfo
    from tests.conftest import tiny_qwen2

    rows = []
    smol = load_engine(EngineConfig(device=args.device, default_stop=()))
    rows.append(compare(smol.model, smol.tokenizer, smol.info, "SmolLM2-135M (embedded)"))
    tiny = tiny_qwen2(vocab_size=len(smol.tokenizer)).to(args.device)
    tiny.config.eos_token_id = tiny.generation_config.eos_token_id = smol.tokenizer.eos_token_id
    if args.device == "cuda":
        tiny = tiny.half()
    info = ModelInfo("tiny-qwen2", args.device, "", 2048, len(smol.tokenizer))
    rows.append(compare(tiny, smol.tokenizer, info, "tiny Qwen2 (random)"))
    qwen = AutoConfig.for_model(
        "qwen2",
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        hidden_size=5120,
    )
    per = {kv: bytes_per_token(qwen, torch.float16, kv) for kv in ("auto", "int8")}
    capacity = {"qwen14b_bytes_per_position": per, "capacity_ratio": per["auto"] / per["int8"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_dtype.json").write_text(json.dumps({"rows": rows, **capacity}, indent=2))
    print(
        f"\n{'model':<26} {'dtype':>8} {'same greedy':>11} {'tokens':>6} {'max |d|':>8} "
        f"{'mean |d|':>9} {'bytes/pos auto -> int8':>24}"
    )
    for r in rows:
        b = r["bytes_per_position"]
        print(
            f"{r['model']:<26} {r['dtype']:>8} {r['same_greedy_tokens']:>5}/{r['requests']:<5} "
            f"{r['tokens_compared']:>6} {r['max_logprob_diff']:>8.4f} "
            f"{r['mean_logprob_diff']:>9.5f} {b['auto']:>11} -> {b['int8']:<10}"
        )
    print(
        f"Qwen-14B: {per['auto'] / 1024:.0f} KB -> {per['int8'] / 1024:.0f} KB per position "
        f"(fp16 -> int8): {capacity['capacity_ratio']:.2f}x the positions in the same memory"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
