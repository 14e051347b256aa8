"""Decode speed of a Qwen-14B-shaped 8-bit GPTQ model, against the bandwidth bound and a peer.

    python bench/decode.py                       # prompts of 128 and 1,500 tokens, 64 new tokens
    python bench/decode.py --prompt-lengths 128 --variants fused,unfused --profile

Builds the checkpoint first (random packed weights in the exact Qwen-14B shape, as `onegpu quantize`
writes them; see train_14b.py), or takes `--checkpoint`. Times, in one run on one GPU (capped at
24 GiB):
  - bandwidth: a large device-to-device copy (bytes read + written per second);
  - onegpu: the serving engine (`Engine.generate`, logprobs and stop checks included) as
    `onegpu serve` loads it, one request alone, then 1, 2, 4, 8, 16 requests decoding together
    (aggregate tokens/s); each variant (`fused`: the defaults; `unfused`: --no-fuse) in turn;
  - transformers in a child process (own memory cap, own time limit): `generate()` on the same
    checkpoint as 2023 entries ran it (eager, dynamic cache), and the peer: an eager prefill
    into a static cache, then one-token steps of the forward under
    `torch.compile(mode="reduce-overhead", fullgraph=True)` (gpt-fast's recipe), on the same
    shape with torchao's int8 weight-only Linear (`--peer torchao`, the default) or on the
    checkpoint's Marlin layers (`--peer marlin`); what a user would try instead;
  - with --profile: torch profiler's kernels per decode step, for every variant: one request of
    128 tokens by default, or --profile-rows requests of --profile-length tokens sampled at
    --profile-temperature (a summary-shaped step: 9 rows of 1,000 tokens at 0.3).
Decode tokens/s excludes the prefill and first token. bound = bandwidth / bytes read per token
(all weights except the embedding table, plus the KV cache of the context). Prints a table last and
writes decode.json to $OUT (or ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_14b import QWEN_14B, WORDS, build_checkpoint, make_tokenizer, tokenizer_of  # noqa: E402

# Kernel constants a variant sets before loading (an A/B of a tuning choice in one call): blocks
# per decode-attention program at every batch size, 4 (`split4`) or 16 (`split16`), against
# the default's choice by batch size (`kernels.split_blocks`).
KERNEL_CONSTANTS = {"split4": {"SPLIT_BLOCKS_MANY": 4}, "split16": {"SPLIT_BLOCKS_FEW": 16}}
# Each variant's EngineConfig fields (the kernel-constant variants load the defaults).
VARIANTS = {
    "fused": {},
    "unfused": {"fuse": False},
    "deterministic": {"deterministic": True},
    "in-order": {"overlap": False},  # each step recorded before the next is launched
} | dict.fromkeys(KERNEL_CONSTANTS, {})


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


# A pause of the GPU at least this long lies between two passes (the host choosing, recording and
# launching the next step); shorter ones lie between two kernels of one pass.
HOST_GAP_US = 40.0


def gpu_timeline(intervals: list[tuple[float, float]], steps: int) -> dict:
    """Per step, from the kernels' (start, end) in microseconds: time some kernel ran, pauses
    between kernels of a pass (< HOST_GAP_US) and pauses between passes (the host's turn). The
    profiler's CPU tracing slows the host, so the last overstates the host's turn in an untraced
    step; the table prints the untraced wall time less the first two instead."""
    busy = short = long = 0.0
    reach = None  # where the kernels so far end
    for start, end in sorted(intervals):
        if reach is not None and start > reach:
            if start - reach < HOST_GAP_US:
                short += start - reach
            else:
                long += start - reach
        if reach is None or end > reach:
            busy += end - (start if reach is None else max(start, reach))
            reach = end
    return {
        "busy_ms_per_step": busy / 1e3 / steps,
        "between_kernels_ms_per_step": short / 1e3 / steps,
        "between_passes_ms_per_step": long / 1e3 / steps,
    }


PREFILL_STEPS = 1000  # steps for the profiled rows to be admitted and prefilled


def profile_decode(
    engine, prompt: str, rows: int = 1, temperature: float = 0.0, steps: int = 16
) -> dict:
    """`rows` requests decoding together: wall time per step, and the profiler's kernels per
    step. The requests share `prompt` as a prefix, as HELM's summaries share their instructions
    and shots: each still attends over all its positions, while the cache holds the shared
    blocks once (9 unique 1,000-token prompts do not fit a 24 GiB cap's 6,464 positions)."""
    from concurrent.futures import Future

    from torch.profiler import ProfilerActivity, profile

    from onegpu.engine.types import GenerationRequest

    for i in range(rows):
        request = GenerationRequest(
            prompt=f"{prompt} {i}" if rows > 1 else prompt,
            max_new_tokens=3 * steps,
            min_new_tokens=3 * steps,
            temperature=temperature,
            seed=i,
        )
        future: Future = Future()
        future.set_running_or_notify_cancel()
        engine.admit(request, future)
    scheduler = engine.scheduler
    for _ in range(PREFILL_STEPS):
        if len(scheduler.running) == rows and not any(s.prefilling for s in scheduler.running):
            break
        engine.step()
    else:
        raise RuntimeError(
            f"the {rows} profiled rows were not all decoding after {PREFILL_STEPS} steps "
            "(more positions than the KV cache holds?)"
        )
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.busy:
        engine.step()
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us <= 0 or str(getattr(event, "device_type", "")).endswith("CPU"):
            continue
        kernels.append(
            {
                "name": event.key[:90],
                "calls_per_step": event.count / steps,
                "us_per_step": device_us / steps,
            }
        )
    kernels.sort(key=lambda k: -k["us_per_step"])
    intervals = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if not str(getattr(e, "device_type", "")).endswith("CPU") and e.time_range.end > 0
    ]
    return gpu_timeline(intervals, steps) | {
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": sum(k["us_per_step"] for k in kernels) / 1e3,
        "launches_per_step": sum(k["calls_per_step"] for k in kernels),
        "top": kernels,  # every kernel, slowest first
    }


def time_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> dict:
    """transformers generate(), greedy: decode rate from the difference of two lengths."""

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    short, full = run(1), run(new_tokens)
    return {"first_token_s": short, "decode_tok_s": (new_tokens - 1) / (full - short)}


def transformers_child(args) -> int:
    """In a child process: eager generate() on the checkpoint (what 2023 entries ran), then the
    peer: generate() with a static cache and the forward under torch.compile, on the same
    checkpoint (`--peer marlin`) or on the same shape quantized by torchao (`--peer torchao`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from onegpu.device import cap_gpu_memory

    folder = Path(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result: dict = {"peer_kind": args.peer, "stages_s": {}}
    out = Path(args.child_out)
    began = time.perf_counter()

    def reached(stage: str) -> None:  # where a child stopped by its time limit got to
        result["stages_s"][stage] = round(time.perf_counter() - began, 1)
        out.write_text(json.dumps(result))
        print(f"transformers child: {stage} at {result['stages_s'][stage]} s", flush=True)

    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    if args.peer == "torchao":
        model = torchao_model(folder)  # built without the cap: fp16 weights before int8
        cap_gpu_memory(torch.device("cuda"), args.gpu_memory_gib)
        reached("quantized")
    else:
        cap_gpu_memory(torch.device("cuda"), args.gpu_memory_gib)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float16,
            device_map={"": "cuda"},
            quantization_config=GPTQConfig(bits=8, backend="marlin"),
        ).eval()
        for length in lengths:
            ids = tokenizer(prompt_of(tokenizer, length, seed=length), return_tensors="pt")
            ids = ids["input_ids"].cuda()
            entry = result.setdefault(str(ids.shape[1]), {})
            entry["generate"] = time_generate(model, ids, args.new_tokens)
            reached(f"generate {ids.shape[1]}")
    # gpt-fast's recipe: the prompt in one eager pass into a static cache, then each next token
    # from one compiled one-token step (reduce-overhead records its CUDA graph). Compiling the
    # forward under generate() compiled the prompt's shape too and had not finished in 320 s.
    from transformers import StaticCache

    prompts = [
        tokenizer(prompt_of(tokenizer, n, seed=n), return_tensors="pt")["input_ids"].cuda()
        for n in lengths
    ]
    longest = max(p.shape[1] for p in prompts) + args.new_tokens
    cache = StaticCache(config=model.config, max_cache_len=longest)
    # gpt-fast's inductor settings. Coordinate-descent tuning is what makes inductor turn a
    # one-row matmul into a fused multiply-and-sum (the int8-to-fp16 cast folded into it): without
    # it, each step casts every int8 weight to a full fp16 copy first (40.5 tok/s on an H100).
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = True
    inductor.triton.unique_kernel_names = True
    inductor.fx_graph_cache = True
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    for ids in prompts:
        start = time.perf_counter()
        for attempt in ("compiled", "graphs recorded"):
            static_decode(model, step, cache, ids, 8, reached if attempt == "compiled" else None)
            reached(f"{attempt} {ids.shape[1]}")
        go = os.environ.get("ONEGPU_PEER_GO")
        if go:  # compiled beside other work: time it only once the caller says the GPU is free
            reached("waiting")
            while not Path(go).exists():
                time.sleep(0.5)
        entry = result.setdefault(str(ids.shape[1]), {})
        entry["peer_warmup_s"] = time.perf_counter() - start
        entry["peer"] = {"decode_tok_s": static_decode(model, step, cache, ids, args.new_tokens)}
        reached(f"peer {ids.shape[1]}")
    return 0


def static_decode(model, step, cache, ids: torch.Tensor, new_tokens: int, reached=None) -> float:
    """Greedy decode tokens/s of `step` (the compiled forward) after an eager prefill of `ids`
    [1, T] into the static `cache`; `reached(stage)`, if given, after the prefill and the first
    step (the compile)."""

    def wait() -> None:
        if ids.is_cuda:
            torch.cuda.synchronize()

    cache.reset()
    length = ids.shape[1]
    with torch.no_grad():
        positions = torch.arange(length, device=ids.device)
        logits = model(input_ids=ids, past_key_values=cache, cache_position=positions).logits
        token = logits[:, -1:].argmax(-1)  # [1, 1]
        wait()
        if reached:
            reached("prefilled")
        start = time.perf_counter()
        for i in range(new_tokens - 1):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
            position = torch.tensor([length + i], device=ids.device)
            out = step(input_ids=token, past_key_values=cache, cache_position=position)
            token = out.logits[:, -1:].argmax(-1)
            if reached and i == 0:
                wait()
                reached("first step")
        wait()
    return (new_tokens - 1) / (time.perf_counter() - start)


def torchao_model(folder: Path) -> torch.nn.Module:
    """The checkpoint's architecture with random fp16 weights, every Linear then quantized by
    torchao to int8 weight-only (per output channel), as gpt-fast serves a model: the peer."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    for module in model.modules():  # keep activations finite through 40 random layers
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5 / 4)
    quantize_(model, Int8WeightOnlyConfig())
    torch.cuda.empty_cache()
    return model


def run_child(args, role: list[str], folder: Path, child_out: Path, timeout: int) -> dict:
    """This script in a child process (its own GPU memory, cap and time limit); {} on failure."""
    child_out.unlink(missing_ok=True)
    command = [
        sys.executable,
        __file__,
        *role,
        "--checkpoint",
        str(folder),
        "--child-out",
        str(child_out),
        "--prompt-lengths",
        args.prompt_lengths,
        "--new-tokens",
        str(args.new_tokens),
        "--batches",
        args.batches,
        "--gpu-memory-gib",
        str(args.gpu_memory_gib),
        "--peer",
        args.peer,
    ]
    try:
        done = subprocess.run(command, timeout=timeout, check=False)
        status = f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        status = f"stopped after {timeout} s"
    result = json.loads(child_out.read_text()) if child_out.exists() else {}
    print(f"{' '.join(role)}: {status}", flush=True)
    return result | {"status": status}


def variant_child(args) -> int:
    """In a child process: load the engine as `onegpu serve` does (one variant) and time it."""
    from onegpu.engine import kernels
    from onegpu.engine.loading import EngineConfig, load_engine

    for name, value in KERNEL_CONSTANTS.get(args.variant_child, {}).items():
        setattr(kernels, name, value)
    start = time.perf_counter()
    engine = load_engine(
        EngineConfig(
            model=args.checkpoint,
            device="cuda",
            dtype="float16",
            gpu_memory_gib=args.gpu_memory_gib,
            default_stop=(),
            # Plain decode steps: random weights loop, and drafts kept from a loop say nothing
            # of real text (bench/speculation.py measures speculation on a real model).
            speculative_tokens=0,
            **VARIANTS[args.variant_child],
        )
    )
    load_s = time.perf_counter() - start
    weights = weight_bytes(engine.model)
    time_engine(engine, prompt_of(tokenizer_of(engine), 32, seed=99), 4)  # warm-up
    rows = {}
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        prompt = prompt_of(tokenizer_of(engine), length, seed=length)
        ours = time_engine(engine, prompt, args.new_tokens)
        bound = args.bandwidth / (weights + kv_bytes(QWEN_14B, ours["prompt_tokens"]))
        rows[str(ours["prompt_tokens"])] = {
            "bound_tok_s": bound,
            "single": ours,
            "of_bound": ours["decode_tok_s"] / bound,
            "batches": [
                time_batch(engine, prompt, int(n), args.new_tokens) for n in args.batches.split(",")
            ],
        }
    result = {"weight_bytes": weights, "rows": rows, "load_s": load_s}
    if args.profile:
        prompt = prompt_of(tokenizer_of(engine), args.profile_length, seed=args.profile_length)
        result["profile"] = profile_decode(
            engine, prompt, rows=args.profile_rows, temperature=args.profile_temperature
        ) | {"rows": args.profile_rows, "prompt_tokens": args.profile_length}
    result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.child_out).write_text(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lengths", default="128,1500")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,2,4,8,16", help="rows decoding together")
    parser.add_argument("--variants", default="fused,unfused", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="top kernels per decode step")
    parser.add_argument("--profile-rows", type=int, default=1, help="requests in profiled steps")
    parser.add_argument("--profile-length", type=int, default=128, help="their prompt tokens")
    parser.add_argument("--profile-temperature", type=float, default=0.0)
    parser.add_argument("--no-transformers", action="store_true", help="skip generate() + peer")
    parser.add_argument("--peer-timeout", type=int, default=300)
    parser.add_argument(
        "--peer",
        choices=("torchao", "marlin"),
        default="torchao",
        help="the compiled peer: torchao int8 weight-only (gpt-fast's recipe) on the same shape, "
        "or the checkpoint's Marlin layers (torch.compile did not finish in 450 s, 2026-11-29)",
    )
    parser.add_argument("--variant-timeout", type=int, default=240)
    parser.add_argument("--checkpoint", help="an existing 14B-shaped GPTQ folder to load")
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    # The child processes' roles (run_child).
    parser.add_argument("--transformers-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant-child", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    if args.transformers_child:
        return transformers_child(args)
    if args.variant_child:
        return variant_child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(), "new_tokens": args.new_tokens}
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_gb_s"] = bandwidth / 1e9
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as work:
        if args.checkpoint:
            folder = Path(args.checkpoint)
        else:
            folder = Path(work) / "qwen14b-gptq8"
            build_checkpoint(folder, QWEN_14B, make_tokenizer(WORDS))
        if not args.no_transformers:
            role = ["--transformers-child"]
            result["transformers"] = run_child(
                args, role, folder, out / "decode-transformers.json", args.peer_timeout
            )
        result["variants"] = {}
        for name in filter(None, args.variants.split(",")):  # "": the peer alone
            role = ["--variant-child", name, "--bandwidth", str(bandwidth)]
            if args.profile:
                role += ["--profile", "--profile-rows", str(args.profile_rows)]
                role += ["--profile-length", str(args.profile_length)]
                role += ["--profile-temperature", str(args.profile_temperature)]
            measured = run_child(
                args, role, folder, out / f"decode-{name}.json", args.variant_timeout
            )
            if "rows" in measured:
                result["variants"][name] = measured
            (out / "decode.json").write_text(json.dumps(result, indent=2))
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['gpu']}: copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s")
    variants = result["variants"]
    hf = result.get("transformers", {})
    if not variants:
        print("no engine variant finished: see the log")
        return
    for name, v in variants.items():
        print(
            f"  {name}: weights read per token {v['weight_bytes'] / 1e9:.2f} GB, "
            f"load {v['load_s']:.0f} s, peak {v['peak_gpu_gib']:.1f} GiB"
        )
    names = list(variants)
    header = f"{'prompt':>7} {'bound':>7} " + " ".join(f"{n:>9} {'of bound':>8}" for n in names)
    print(header + f" {'generate':>8} {'peer':>7} {names[0] + '/peer':>11}")
    for prompt, row in variants[names[0]]["rows"].items():
        line = f"{prompt:>7} {row['bound_tok_s']:>7.1f} "
        for n in names:
            r = variants[n]["rows"][prompt]
            line += f"{r['single']['decode_tok_s']:>9.1f} {r['of_bound']:>8.2f} "
        entry = hf.get(prompt, {})
        generate = entry.get("generate", {}).get("decode_tok_s", float("nan"))
        peer = entry.get("peer", {}).get("decode_tok_s", float("nan"))
        line += f"{generate:>8.1f} {peer:>7.1f} {row['single']['decode_tok_s'] / peer:>11.2f}"
        print(line)
        for n in names:
            batches = variants[n]["rows"][prompt]["batches"]
            one = batches[0]["decode_tok_s"]
            print(
                f"  {n}, rows together: "
                + ", ".join(
                    f"{b['rows']}: {b['decode_tok_s']:.0f} tok/s ({b['decode_tok_s'] / one:.1f}x, "
                    f"{b['step_ms']:.1f} ms/step)"
                    for b in batches
                )
            )
    print(f"transformers child: {hf.get('status', 'not run')}, stages {hf.get('stages_s', {})}")
    for i, name in enumerate(names):
        profile = variants[name].get("profile")
        if not profile:
            continue
        host = (
            profile["wall_ms_per_step"]
            - profile["busy_ms_per_step"]
            - profile["between_kernels_ms_per_step"]
        )
        shape = f"{profile.get('rows', 1)} x {profile.get('prompt_tokens', 128)} tokens"
        print(
            f"\nprofile ({name}, {shape}): {profile['wall_ms_per_step']:.2f} ms/step wall, "
            f"{profile['kernel_ms_per_step']:.2f} ms of kernels, "
            f"{profile['launches_per_step']:.0f} kernels per step; GPU busy "
            f"{profile['busy_ms_per_step']:.2f} ms, idle between kernels "
            f"{profile['between_kernels_ms_per_step']:.2f} ms, between passes "
            f"{profile['between_passes_ms_per_step']:.2f} ms traced; the host's turn untraced: "
            f"{host:.2f} ms"
        )
        # Every kernel of the first variant; of the others, the attention kernels they change.
        top = profile["top"] if i == 0 else [k for k in profile["top"] if "_decode" in k["name"]]
        for k in top[:30]:
            print(f"  {k['us_per_step']:>8.1f} us {k['calls_per_step']:>6.1f}x  {k['name']}")


if __name__ == "__main__":
    sys.exit(main())
