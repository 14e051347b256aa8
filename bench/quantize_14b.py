"""GPTQ 8-bit quantization of a Qwen-14B-shaped bf16 model: wall time, peak GPU and host memory.

    python bench/quantize_14b.py                           # build, quantize, load and answer once
    python bench/quantize_14b.py --skip-serve              # build and quantize only (no Marlin JIT)
    python bench/quantize_14b.py --shape tiny --device cpu --skip-serve   # a self-check (a minute)

Weights do not change the cost of GPTQ, so the base is built here: random bf16 tensors in the exact
Qwen-14B shapes in the Qwen2 layout (40 layers, hidden 5120, 40 heads, MLP 13696, vocabulary
152064; about 28 GB), drawn on the GPU and written one safetensors shard per layer. It is then
quantized by `onegpu.quantize.gptq.quantize` itself (8-bit, group 128, calibration on a local file
of random common words, perplexity evaluation off), and the result is loaded the way `onegpu serve`
does (`load_engine`: Marlin kernels on CUDA, GPU capped at `--gpu-memory-gib`) to answer one greedy
request of 8 tokens. Each phase records its wall time, peak GPU memory (max_memory_allocated) and
the process's peak host RSS so far. Prints a table last and writes quantize_14b.json to $OUT (or
./bench-out), rewritten after every phase so a killed run still leaves what completed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_14b import (  # noqa: E402
    QWEN_14B,
    TINY,
    WORDS,
    linear_shapes,
    make_tokenizer,
    qwen2_config,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPT = "The capital of France is"
NEW_TOKENS = 8


def _rss_gib() -> float:
    # Linux reports KiB; children covers any worker processes GPTQModel may start.
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return self_kib / 2**20


def _children_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# -- the bf16 checkpoint ------------------------------------------------------------------------


def _weight_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """nn.Linear weight shapes, (out_features, in_features), of each projection."""
    return {name: (n_out, n_in) for name, (n_in, n_out) in linear_shapes(shape).items()}


def build_bf16_checkpoint(folder: Path, shape: dict, tokenizer, device: torch.device) -> Path:
    """Write a random bf16 Qwen2 checkpoint with `shape` into `folder`, one shard per layer.

    Tensors are drawn on `device` (a seeded generator, std 0.02; norms 1; q/k/v biases 0), moved
    to the CPU and written by a background thread while the next layer is drawn.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    h, v = shape["hidden_size"], shape["vocab_size"]
    bf16 = torch.bfloat16
    weight_map: dict[str, str] = {}

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=bf16).mul_(0.02).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=bf16)

    def write(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})

    shapes = _weight_shapes(shape)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []

        def shard(name: str, tensors: dict) -> None:
            weight_map.update(dict.fromkeys(tensors, name))
            if len(pending) > 1:  # at most two shards in host memory at once
                pending.pop(0).result()
            pending.append(pool.submit(write, name, tensors))

        shard(
            "embed.safetensors",
            {
                "model.embed_tokens.weight": randn(v, h),
                "lm_head.weight": randn(v, h),
                "model.norm.weight": ones(h),
            },
        )
        for i in range(shape["num_hidden_layers"]):
            tensors = {
                f"model.layers.{i}.input_layernorm.weight": ones(h),
                f"model.layers.{i}.post_attention_layernorm.weight": ones(h),
            }
            for name in LINEARS:
                prefix = f"model.layers.{i}.{'self_attn' if name in ATTENTION else 'mlp'}.{name}"
                n_out, n_in = shapes[name]
                tensors[f"{prefix}.weight"] = randn(n_out, n_in)
                if name in ("q_proj", "k_proj", "v_proj"):  # Qwen's q/k/v carry biases
                    tensors[f"{prefix}.bias"] = torch.zeros(n_out, dtype=bf16)
            shard(f"layer-{i:03d}.safetensors", tensors)
        for f in pending:
            f.result()

    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = qwen2_config(shape, tokenizer, "bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    return folder


def write_calibration(path: Path, n_words: int) -> Path:
    """Random common words (about one token each), enough for the calibration windows."""
    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 32]) + "." for i in range(0, len(words), 32)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the driver ---------------------------------------------------------------------------------


class Bench:
    """Runs named phases, records time / peak GPU / peak RSS, and rewrites the JSON after each."""

    def __init__(self, out_file: Path, result: dict, cuda: bool) -> None:
        self.out_file, self.result, self.cuda = out_file, result, cuda
        self.result.setdefault("phases", {})

    def save(self) -> None:
        self.out_file.write_text(json.dumps(self.result, indent=2, default=str))

    def run(self, name: str, fn):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        record: dict = {}
        self.result["phases"][name] = record
        try:
            value = fn(record)
            if self.cuda:
                torch.cuda.synchronize()
            return value
        except BaseException as e:
            record["error"] = f"{type(e).__name__}: {e}"
            record["traceback"] = traceback.format_exc()
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            record["peak_gpu_gib"] = (
                torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
            )
            record["peak_rss_gib"] = _rss_gib()
            record["peak_children_rss_gib"] = _children_rss_gib()
            print(
                f"[{name}] {record['seconds']:.1f} s"
                + (f" -- FAILED: {record['error']}" if "error" in record else ""),
                flush=True,
            )
            self.save()


def print_table(result: dict) -> None:
    print(
        f"\nGPTQ {result['bits']}-bit, group {result['group_size']}, {result['shape_name']} "
        f"on {result['device']}, {result['n_samples']} x {result['seq_len']} calibration tokens"
    )
    print(f"{'phase':<12} {'seconds':>9} {'peak GPU':>10} {'host RSS':>10}  note")
    for name, r in result["phases"].items():
        gpu = "-" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.2f} GiB"
        note = r.get("error", "")
        if not note and name == "quantize":
            gb = r.get("output_bytes", 0) / 1e9
            rec = r.get("onegpu_json_peak_gpu_gib")
            note = f"output {gb:.2f} GB" + (f", onegpu.json peak {rec:.2f} GiB" if rec else "")
        if not note and name == "serve":
            note = f"{r.get('new_tokens')} tokens, finite={r.get('all_finite')}: {r.get('text')!r}"
        if not note and name == "build":
            note = f"checkpoint {r.get('checkpoint_bytes', 0) / 1e9:.2f} GB"
        print(
            f"{name:<12} {r['seconds']:>9.1f} {gpu:>10} {r['peak_rss_gib']:>6.2f} GiB  {note}"[:160]
        )
    if "error" in result:
        print(f"FAILED: {result['error']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=["qwen14b", "tiny"], default="qwen14b")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--group-size", type=int, default=None, help="default 128 (32 for tiny)")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gpu-memory-gib", type=float, default=24.0)
    p.add_argument("--skip-serve", action="store_true", help="do not load and query the output")
    p.add_argument("--serve-dtype", default=None, help="default float16 on CUDA, auto on CPU")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda asked for but CUDA is not available (use --device cpu)")
    shape = dict(QWEN_14B, max_position_embeddings=2048) if args.shape == "qwen14b" else dict(TINY)
    group_size = args.group_size or (128 if args.shape == "qwen14b" else 32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        device_name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        device_name = "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)

    result: dict = {
        "device": device_name,
        "shape_name": args.shape,
        "bits": args.bits,
        "group_size": group_size,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "gpu_memory_gib": args.gpu_memory_gib,
    }
    bench = Bench(out / "quantize_14b.json", result, cuda)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="onegpu-quant-bench-", dir=os.environ.get("TMPDIR")))
    base, quantized = work / "base-bf16", work / "gptq"
    code = 0
    try:
        tokenizer = make_tokenizer(WORDS)
        # Room for every id the tokenizer makes (the tiny shape with the real Qwen tokenizer).
        shape["vocab_size"] = max(shape["vocab_size"], -(-len(tokenizer) // 64) * 64)
        result["shape"] = shape

        def build(rec: dict) -> None:
            build_bf16_checkpoint(base, shape, tokenizer, device)
            rec["checkpoint_bytes"] = _dir_bytes(base)

        bench.run("build", build)

        def quant(rec: dict) -> None:
            from onegpu.provenance import RECORD_FILE
            from onegpu.quantize.gptq import quantize
            from onegpu.settings import QuantizeSettings

            calib = write_calibration(
                work / "calibration.txt", max(4 * args.seq_len, args.n_samples * args.seq_len)
            )
            settings = QuantizeSettings(
                model=str(base),
                output=quantized,
                bits=args.bits,
                group_size=group_size,
                calibration=str(calib),
                samples=args.n_samples,
                seq_len=args.seq_len,
                device=str(device),
                gpu_memory_gib=args.gpu_memory_gib if cuda else None,
                eval_data=None,
                overwrite=True,
            )
            quantize(settings)
            rec["output_bytes"] = _dir_bytes(quantized)
            meta = json.loads((quantized / RECORD_FILE).read_text())
            rec["onegpu_json_timings_s"] = meta.get("timings_s")
            rec["onegpu_json_memory"] = meta.get("memory")
            peaks = (meta.get("memory") or {}).get("peak_gpu_bytes") or {}
            if peaks:
                rec["onegpu_json_peak_gpu_gib"] = max(peaks.values()) / 2**30
            rec["libraries"] = meta.get("libraries")

        bench.run("quantize", quant)
        if cuda:
            # quantize() resets the peak counter per phase; its own per-phase peaks are exact.
            q = result["phases"]["quantize"]
            q["peak_gpu_gib"] = max(q["peak_gpu_gib"] or 0.0, q.get("onegpu_json_peak_gpu_gib", 0))
            bench.save()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)  # free the disk before loading

        if not args.skip_serve:

            def serve(rec: dict) -> None:
                from onegpu.engine.loading import EngineConfig, load_engine
                from onegpu.engine.types import GenerationRequest

                start = time.perf_counter()
                engine = load_engine(
                    EngineConfig(
                        model=str(quantized),
                        device=str(device),
                        dtype=args.serve_dtype or ("float16" if cuda else "auto"),
                        gpu_memory_gib=args.gpu_memory_gib if cuda else None,
                        default_stop=(),
                    )
                )
                rec["load_s"] = round(time.perf_counter() - start, 3)
                rec["model_info"] = getattr(engine, "info", None)
                completion = engine.generate(
                    GenerationRequest(prompt=PROMPT, max_new_tokens=NEW_TOKENS, temperature=0)
                )
                logprobs = [t.logprob for t in completion.tokens]
                rec["generate_s"] = completion.seconds
                rec["new_tokens"] = completion.new_tokens
                rec["finish_reason"] = completion.finish_reason
                rec["text"] = completion.text
                rec["logprobs"] = logprobs
                rec["all_finite"] = all(math.isfinite(x) for x in logprobs)
                if completion.new_tokens != NEW_TOKENS or len(logprobs) != NEW_TOKENS:
                    raise RuntimeError(
                        f"expected {NEW_TOKENS} tokens, got {completion.new_tokens} "
                        f"({completion.finish_reason})"
                    )
                if not rec["all_finite"]:
                    raise RuntimeError(f"non-finite logprobs: {logprobs}")

            bench.run("serve", serve)
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result.setdefault("traceback", traceback.format_exc())
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        result["total_s"] = sum(r["seconds"] for r in result["phases"].values())
        result["peak_rss_gib"] = _rss_gib()
        if cuda:
            result["peak_gpu_gib"] = max(
                (r["peak_gpu_gib"] or 0.0 for r in result["phases"].values()), default=0.0
            )
        bench.save()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if code:
        print(result.get("traceback", ""), file=sys.stderr)
    print_table(result)
    print(f"wrote {bench.out_file}")
    return code


if __name__ == "__main__":
    sys.exit(main())
