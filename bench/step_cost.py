"""What a decode step costs with k + 1 positions per row, and what a prefill chunk costs, on the
14B-shaped 8-bit model: the figures speculation and long prompts are judged by.

    python bench/step_cost.py --checkpoint /tmp/onegpu-ckpt/gptq8-qwen14b
    python bench/step_cost.py --checkpoint CKPT --rows 1,4 --widths 1,5 --chunks 512

Loads the engine as `onegpu serve` does (Marlin, GPU capped at 24 GiB), then:
  - step: for each number of rows and each width (positions per row: 1 = plain decode, k + 1 =
    a verifying pass with k drafted tokens), replays the captured graph of that pass over rows
    whose contexts hold `--context` tokens; milliseconds per step and the ratio to width 1.
    Speculation wins where tokens kept per verifying pass (measured on a real model by
    bench/speculation.py) exceed that ratio;
  - prefill: one packed pass over a chunk of N prompt tokens, on Marlin and on weights
    dequantized per pass for cuBLAS (dense_prefill.py, when it loaded): milliseconds and TFLOPS
    (2 x linear weights x tokens, attention excluded);
  - gemm: each projection shape of the model at M rows, Marlin against dequantizing the 8-bit
    weight to fp16 (timed) and one cuBLAS matmul: which is faster per chunk size.
Prints tables last; writes step_cost.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def timed(fn, iters: int) -> float:
    """Milliseconds per call of `fn` (CUDA-synchronized; one untimed call first)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / iters


def step_costs(engine, rows_list: list[int], widths: list[int], context: int) -> list[dict]:
    from onegpu.engine.forward import Row

    forward, pool = engine.forward, engine.pool
    block = pool.block_size
    results = []
    for rows in rows_list:
        tables: list[list[int]] = []
        try:
            for _ in range(rows):
                tables.append(pool.allocate(-(-(context + max(widths)) // block)))
            base = None
            for width in widths:
                batch = [Row(i, [1] * width, context, t) for i, t in enumerate(tables)]
                with torch.no_grad():
                    ms = timed(lambda batch=batch, width=width: forward._run(batch, width), 30)
                base = base or ms
                results.append({"rows": rows, "width": width, "ms": ms, "of_width_1": ms / base})
                print(f"step rows={rows} width={width}: {ms:.2f} ms ({ms / base:.2f}x)", flush=True)
        finally:
            for t in tables:
                pool.release(t)
    return results


def prefill_costs(engine, chunks: list[int], params: int) -> list[dict]:
    """Each chunk size on Marlin, and (where the engine installed it) on weights dequantized
    per pass for cuBLAS (dense_prefill.py), in turn on the same engine."""
    from onegpu.engine.forward import Chunk

    dense = next(
        (m.onegpu_dense for m in engine.model.modules() if hasattr(m, "onegpu_dense")), None
    )
    kernels = {"marlin": 10**9} | ({"dense": 1} if dense is not None else {})
    default_rows = dense.min_rows if dense is not None else None
    pool, block = engine.pool, engine.pool.block_size
    results = []
    for n in chunks:
        table = pool.allocate(-(-n // block))
        chunk = [Chunk(0, [(7 * i) % 1000 + 1 for i in range(n)], 0, table, "last")]
        entry: dict = {"tokens": n}
        try:
            for kernel, min_rows in kernels.items():
                if dense is not None:
                    dense.min_rows = min_rows
                with torch.no_grad():
                    ms = timed(lambda chunk=chunk: engine.forward.prefill(chunk), 5)
                tflops = 2 * params * n / (ms / 1e3) / 1e12
                entry[kernel] = {"ms": ms, "tflops": tflops}
                print(f"prefill {n} tokens, {kernel}: {ms:.1f} ms, {tflops:.0f} TFLOPS", flush=True)
        finally:
            pool.release(table)
            if dense is not None:
                dense.min_rows = default_rows
        results.append(entry)
    return results


def linear_params(model: torch.nn.Module) -> int:
    """Weights of every Linear and GPTQ layer (one per 8-bit code), the embedding excluded."""
    from onegpu.engine.gptq_layers import is_gptq

    return sum(
        m.in_features * m.out_features
        for m in model.modules()
        if is_gptq(m) or isinstance(m, torch.nn.Linear)
    )


def dequantized(layer) -> torch.Tensor:
    """The fp16 weight [in, out] of a symmetric 8-bit GPTQ layer, from its packed tensors."""
    qweight, scales, g_idx = layer.onegpu_packed
    shifts = torch.arange(0, 32, 8, device=qweight.device, dtype=torch.int32)
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & 0xFF  # [in / 4, 4, out]
    codes = codes.reshape(-1, qweight.shape[1]).to(torch.float16)
    return (codes - 128) * scales[g_idx.long()]


def gemm_costs(engine, ms_list: list[int]) -> list[dict]:
    """Marlin against dequantize + cuBLAS, for one decoder layer's projections."""
    from onegpu.engine.gptq_layers import CheckpointTensors

    if not ms_list:
        return []
    layer = engine.model.model.layers[0]
    checkpoint = CheckpointTensors(Path(engine.info.name))
    named = {
        "qkv": (layer.self_attn.qkv_proj, ["q_proj", "k_proj", "v_proj"], "self_attn"),
        "o": (layer.self_attn.o_proj, ["o_proj"], "self_attn"),
        "gate_up": (layer.mlp.gate_up_proj, ["gate_proj", "up_proj"], "mlp"),
        "down": (layer.mlp.down_proj, ["down_proj"], "mlp"),
    }
    results = []
    for name, (module, parts, where) in named.items():
        prefix = [f"model.layers.0.{where}.{p}" for p in parts]
        qweight = torch.cat([checkpoint.get(f"{n}.qweight") for n in prefix], 1).cuda()
        scales = torch.cat([checkpoint.get(f"{n}.scales") for n in prefix], 1).cuda().half()
        g_idx = checkpoint.get(f"{prefix[0]}.g_idx").cuda()
        module.onegpu_packed = (qweight, scales, g_idx)
        weight = dequantized(module)
        in_features = weight.shape[0]
        for m in ms_list:
            x = torch.randn(m, in_features, dtype=torch.float16, device="cuda")
            marlin = timed(lambda x=x, module=module: module(x), 20)
            unpack = timed(lambda module=module: dequantized(module), 10)
            cublas = timed(lambda x=x, weight=weight: x @ weight, 20)
            results.append(
                {
                    "proj": name,
                    "shape": list(weight.shape),
                    "m": m,
                    "marlin_ms": marlin,
                    "dequant_ms": unpack,
                    "cublas_ms": cublas,
                    "dequant_cublas_ms": unpack + cublas,
                }
            )
            print(
                f"gemm {name} {tuple(weight.shape)} m={m}: marlin {marlin:.3f} ms, dequant "
                f"{unpack:.3f} + cublas {cublas:.3f} ms",
                flush=True,
            )
        del module.onegpu_packed, weight
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a 14B-shaped GPTQ folder")
    parser.add_argument("--rows", default="1,4,10,16")
    parser.add_argument("--widths", default="1,3,4,5,9", help="positions per row (k + 1)")
    parser.add_argument("--context", type=int, default=384, help="tokens cached per row")
    parser.add_argument("--chunks", default="128,256,512,1024,2048", help="prefill chunk sizes")
    parser.add_argument("--gemm-m", default="16,128,512,2048", help="rows of the GEMM check")
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/step_cost.py needs a CUDA GPU")
    from onegpu.engine.loading import EngineConfig, load_engine

    widths = [int(w) for w in args.widths.split(",")]
    engine = load_engine(
        EngineConfig(
            model=args.checkpoint,
            device="cuda",
            dtype="float16",
            gpu_memory_gib=args.gpu_memory_gib,
            speculative_tokens=max(widths) - 1,
            prefill_chunk=max(int(c) for c in args.chunks.split(",")),
        )
    )
    params = linear_params(engine.model)
    result: dict = {"gpu": torch.cuda.get_device_name(), "context": args.context}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = [int(r) for r in args.rows.split(",") if r]
    for name, run in (
        ("step", lambda: step_costs(engine, steps, widths, args.context)),
        (
            "prefill",
            lambda: prefill_costs(engine, [int(c) for c in args.chunks.split(",")], params),
        ),
        ("gemm", lambda: gemm_costs(engine, [int(m) for m in args.gemm_m.split(",") if m])),
    ):
        try:
            result[name] = run()
        except Exception as exc:  # keep what the other parts measured
            print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        (out / "step_cost.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['gpu']}, context {args.context}: ms per step (x width 1)")
    if isinstance(result["step"], list):
        for rows in steps:
            cells = [r for r in result["step"] if r["rows"] == rows]
            print(
                f"  rows {rows:>2}: "
                + ", ".join(f"w{r['width']} {r['ms']:.2f} ({r['of_width_1']:.2f}x)" for r in cells)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
