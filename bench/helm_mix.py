"""The challenge's request mix from 30 concurrent clients, against the baseline 2023 entries ran.

    python bench/helm_mix.py                                  # 14B-shaped 8-bit model, on CUDA
    python bench/helm_mix.py --shape tiny --device cpu --scale 0.1 --baseline-samples 1  # check

One process, one GPU, one loaded checkpoint (random 8-bit GPTQ weights in the exact Qwen-14B
shape, built first, loaded as `onegpu serve` loads it: Marlin, GPU capped at 24 GiB):
  1. onegpu: the app on a real uvicorn on loopback, `--clients` threads posting over HTTP;
  2. baseline: transformers `generate()` on the same model, one request at a time (greedy or
     sampled, stop strings, scores for logprobs): what the 2023 entries ran.
Two orders of the same kinds of work (`--orders`):
  - helm: run spec by run spec, as `helm-run -n 30` sends them: 7 scenarios, 190 requests; all
    instances of a scenario share its few-shot block (the in-context examples) and differ in the
    last 60-500 tokens; the next scenario starts when the last one is answered;
  - interleaved: cycles of 20 requests (10 multiple choice over 3 few-shot blocks, 4 BIG-bench,
    3 GSM, 3 summaries) shuffled together, all in flight at once.
Prompts are built to token counts with the model's own tokenizer, so they fit the window
whichever tokenizer the checkpoint has. The baseline runs `--baseline-samples` requests of each
scenario (its requests are served one at a time, so times add up) and its total is estimated as
the sum over scenarios of count x mean seconds. Prints tables last; writes helm_mix.LABEL.json.
Works against an older onegpu too (PYTHONPATH=old/src), for a before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from load import HELM_DEFAULTS  # noqa: E402
from step_trace import StepTrace  # noqa: E402
from step_trace import report as steps_report  # noqa: E402
from train_14b import QWEN_14B, TINY, WORDS, build_checkpoint, make_tokenizer, tokenizer_of  # noqa: E402

SHAPES = {"qwen14b": QWEN_14B, "tiny": TINY}


@dataclass(frozen=True)
class Scenario:
    """A run spec: `count` instances sharing a `shot`-token few-shot block, each adding
    `own` tokens, answered with up to `new` tokens."""

    name: str
    kind: str  # mc | short | bigbench | gsm | summary
    count: int
    shot: int
    own: int
    new: int


# HELM's shapes: most scored instances are 1-token multiple choice; a few tasks generate long.
HELM_ORDER = [
    Scenario("mmlu", "mc", 40, 500, 60, 1),
    Scenario("truthful_qa", "mc", 40, 700, 80, 1),
    Scenario("bbq", "mc", 30, 900, 100, 1),
    Scenario("narrative_qa", "short", 40, 600, 100, 20),
    Scenario("big_bench", "bigbench", 20, 300, 100, 64),
    Scenario("gsm", "gsm", 10, 900, 60, 400),
    Scenario("summarization", "summary", 10, 700, 500, 128),
]
# The interleaved mix: multiple choice over three few-shot blocks, and three generating kinds.
INTERLEAVED = [
    Scenario("mc_short", "mc", 0, 420, 50, 1),
    Scenario("mc_medium", "mc", 0, 850, 50, 1),
    Scenario("mc_long", "mc", 0, 1550, 50, 1),
    Scenario("big_bench", "bigbench", 0, 0, 375, 64),
    Scenario("gsm", "gsm", 0, 0, 1125, 400),
    Scenario("summary", "summary", 0, 0, 1000, 128),
]


def text_of(tokenizer, rng: random.Random, tokens: int) -> str:
    """Random common words cut to `tokens` tokens of `tokenizer`."""
    if tokens <= 0:
        return ""
    words = " ".join(rng.choice(WORDS) for _ in range(tokens * 2))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids).strip()


def body_of(scenario: Scenario, shot: str, own: str, seed: int) -> dict:
    """The /process body HELM would send for one instance (every key present)."""
    base = {**HELM_DEFAULTS, "max_new_tokens": scenario.new}
    if scenario.kind == "mc":
        prompt = f"{shot}Question: {own}?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
        return {**base, "prompt": prompt, "top_k_per_token": 5}
    if scenario.kind == "short":
        return {**base, "prompt": f"{shot}Passage: {own}\nAnswer:", "stop_sequences": ["\n"]}
    if scenario.kind == "bigbench":
        return {**base, "prompt": f"{shot}{own}\n"}
    if scenario.kind == "gsm":
        return {**base, "prompt": f"{shot}Q: {own}\nA:", "stop_sequences": ["\n\n"]}
    prompt = f"{shot}Article: {own}\n\nSummarize the above article:"
    return {**base, "prompt": prompt, "temperature": 0.3, "seed": seed}


def helm_order(tokenizer, scale: float) -> list[dict]:
    out = []
    for s, scenario in enumerate(HELM_ORDER):
        rng = random.Random(100 + s)
        shot = text_of(tokenizer, rng, int(scenario.shot * scale))
        shot = f"{shot}\n\n" if shot else ""
        for i in range(scenario.count):
            own = text_of(tokenizer, rng, int(scenario.own * scale))
            body = body_of(scenario, shot, own, seed=1000 * s + i)
            out.append({"scenario": scenario.name, "kind": scenario.kind, "body": body})
    return out


def interleaved(tokenizer, cycles: int, scale: float) -> list[dict]:
    rng = random.Random(0)
    shots = {
        s.name: text_of(tokenizer, random.Random(1000 + i), int(s.shot * scale)) + "\n\n"
        for i, s in enumerate(INTERLEAVED)
        if s.shot
    }
    by_kind = {s.kind: s for s in INTERLEAVED if s.kind != "mc"}
    multiple_choice = [s for s in INTERLEAVED if s.kind == "mc"]
    out = []
    for c in range(cycles):
        kinds = ["mc"] * 10 + ["bigbench"] * 4 + ["gsm"] * 3 + ["summary"] * 3
        random.Random(c).shuffle(kinds)
        for i, kind in enumerate(kinds):
            scenario = multiple_choice[i % 3] if kind == "mc" else by_kind[kind]
            own = text_of(tokenizer, rng, int(scenario.own * scale))
            body = body_of(scenario, shots.get(scenario.name, ""), own, seed=c * 100 + i)
            out.append({"scenario": scenario.name, "kind": kind, "body": body})
    return out


class Peaks:
    """Samples the engine while a run goes on: most requests running, most KV blocks in use."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.running = 0
        self.blocks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        stats = getattr(self.engine, "stats", None)
        while not self._stop.is_set():
            self.running = max(self.running, self.engine.running)
            if stats is not None:
                self.blocks = max(self.blocks, stats()["blocks_in_use"])
            time.sleep(0.01)

    def __enter__(self):
        if self.engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()
        cuda = self.engine.device.type == "cuda"
        self.gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


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


def counters(engine) -> dict[str, int]:
    """The engine's running totals of speculation and preemption ({} for an engine without)."""
    stats = engine.stats() if hasattr(engine, "stats") else {}
    keep = ("speculation_steps", "speculation_passes", "speculation_drafted")
    keep += ("speculation_accepted", "preemptions", "recomputed_tokens")
    return {name: stats[name] for name in keep if name in stats}


def run_onegpu(engine, requests: list[dict], clients: int, *, by_scenario: bool) -> dict:
    """Post `requests` from `clients` threads over HTTP; scenario by scenario if asked."""
    import httpx

    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings
    from tests.live import live_server

    app = create_app(ServeSettings(), engine=engine)
    latencies: list[float] = []
    tokens = 0
    failures: list[str] = []
    lock = threading.Lock()
    groups = (
        [[r for r in requests if r["scenario"] == name] for name in _names(requests)]
        if by_scenario
        else [requests]
    )
    per_group: dict[str, float] = {}
    per_group_engine: dict[str, dict[str, int]] = {}  # what each group added to `counters`
    prompt_tokens = sum(len(engine.tokenize(r["body"]["prompt"])) for r in requests)
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
        reused_before = engine.scheduler.reused_tokens
        per_group_steps: dict[str, dict] = {}  # where each group's seconds went (step_trace)
        with Peaks(engine) as peaks, StepTrace(engine) as trace:
            start = time.perf_counter()
            for group in groups:
                name = group[0]["scenario"] if by_scenario else "all"
                began, counted = time.perf_counter(), counters(engine)
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(post, group))
                ended = time.perf_counter()
                per_group[name] = ended - began
                per_group_engine[name] = {k: v - counted[k] for k, v in counters(engine).items()}
                per_group_steps[name] = trace.summary(began, ended)
            seconds = time.perf_counter() - start
    result = summarize(latencies, tokens, seconds, len(failures))
    reused = engine.scheduler.reused_tokens - reused_before
    result |= {
        "clients": clients,
        "peak_gpu_gib": peaks.gpu_gib,
        "peak_running": peaks.running,
        "peak_blocks_in_use": peaks.blocks or None,
        "failure_samples": failures[:5],
        "prompt_tokens": prompt_tokens,
        "reused_prompt_tokens": reused,
        "reused_share": reused / prompt_tokens,
        "kv_cache_gib": engine.cache.nbytes() / 2**30,
        "scenario_seconds": per_group,
        "scenario_engine": per_group_engine,
        "scenario_steps": per_group_steps,
    }
    if hasattr(engine, "stats"):
        result["engine"] = engine.stats()
    if by_scenario:
        mc = [s.name for s in HELM_ORDER if s.kind == "mc"]
        count = sum(1 for r in requests if r["scenario"] in mc)
        result["mc_requests_per_s"] = count / sum(per_group[name] for name in mc)
    return result


def _names(requests: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["scenario"] for r in requests))


def run_baseline(engine, requests: list[dict], samples: int) -> dict:
    """transformers generate(), one request at a time, on `samples` requests per scenario.

    A one-at-a-time server's total is the sum of its requests' times, so the whole mix's time
    is estimated as sum over scenarios of (its requests) x (mean seconds of its samples)."""
    model, tokenizer = engine.model, tokenizer_of(engine)
    total_seconds = 0.0
    measured: dict[str, list[float]] = {}
    tokens = 0
    for name in _names(requests):
        group = [r for r in requests if r["scenario"] == name]
        for item in group[:samples]:
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
            for score in out.scores:
                torch.log_softmax(score[0].float(), -1).topk(body["top_k_per_token"])
            tokenizer.decode(new, skip_special_tokens=True)
            measured.setdefault(name, []).append(time.perf_counter() - began)
            tokens += len(out.scores) * len(group) / min(samples, len(group))
        total_seconds += len(group) * statistics.mean(measured[name])
    return {
        "requests": len(requests),
        "sampled": sum(len(v) for v in measured.values()),
        "seconds_estimated": total_seconds,
        "requests_per_s": len(requests) / total_seconds,
        "generated_tokens_per_s": tokens / total_seconds,
        "mean_seconds": {name: statistics.mean(v) for name, v in measured.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen14b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--orders", default="helm,interleaved", help="helm, interleaved or both")
    parser.add_argument("--cycles", type=int, default=3, help="20-request interleaved cycles")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every token count")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--baseline-samples", type=int, default=1, help="per scenario; 0: none")
    parser.add_argument("--label", default="onegpu", help="names this engine in the output")
    parser.add_argument("--engine-args", default="{}", help="EngineConfig fields, as JSON")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--checkpoint", help="build the checkpoint here once and reuse it")
    args = parser.parse_args()
    import onegpu
    from onegpu.engine.loading import EngineConfig, load_engine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    result: dict = {"shape": args.shape, "device": args.device, "label": args.label}
    result["onegpu_source"] = str(Path(onegpu.__file__).parent)
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
    tokenizer = make_tokenizer(WORDS)
    result["tokenizer"] = type(tokenizer).__name__ + f" ({len(tokenizer)} ids)"
    folder = Path(args.checkpoint or out / "checkpoint") / f"gptq8-{args.shape}"
    start = time.perf_counter()
    if not (folder / "config.json").exists():
        shape = dict(SHAPES[args.shape])
        shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
        build_checkpoint(folder, shape, tokenizer)
    result["checkpoint_s"] = time.perf_counter() - start
    start = time.perf_counter()
    engine = load_engine(
        EngineConfig(
            model=str(folder),
            device=args.device,
            dtype="float16" if cuda else "float32",
            gpu_memory_gib=args.gpu_memory_gib,
            **json.loads(args.engine_args),
        )
    )
    result["load_s"] = time.perf_counter() - start
    for order in args.orders.split(","):
        if order == "helm":
            requests = helm_order(tokenizer_of(engine), args.scale)
        else:
            requests = interleaved(tokenizer_of(engine), args.cycles, args.scale)
        lengths = [len(engine.tokenize(r["body"]["prompt"])) for r in requests]
        window = engine.info.max_context
        too_long = sum(
            n + r["body"]["max_new_tokens"] > window for n, r in zip(lengths, requests, strict=True)
        )
        if too_long:
            sys.exit(f"{too_long} {order} prompts exceed the {window}-token window: lower --scale")
        entry: dict = {"prompt_tokens": {"min": min(lengths), "max": max(lengths)}}
        entry["onegpu"] = run_onegpu(engine, requests, args.clients, by_scenario=order == "helm")
        if args.baseline_samples:
            base = run_baseline(engine, requests, args.baseline_samples)
            entry["baseline"] = base
            entry["requests_per_s_ratio"] = (
                entry["onegpu"]["requests_per_s"] / base["requests_per_s"]
            )
        result[order] = entry
    (out / f"helm_mix.{args.label}.json").write_text(json.dumps(result, indent=2))
    report(result, args)
    return 0


def report(result: dict, args) -> None:
    print(
        f"\nhelm-mix [{args.label}], {args.shape} on {result.get('gpu', args.device)}, "
        f"load {result['load_s']:.0f} s, {result['tokenizer']}"
    )
    for order in args.orders.split(","):
        entry = result[order]
        ours = entry["onegpu"]
        print(
            f"\n{order}: {ours['requests']} requests, prompts {entry['prompt_tokens']['min']}-"
            f"{entry['prompt_tokens']['max']} tokens; reused {ours['reused_share']:.1%} of "
            f"{ours['prompt_tokens']} prompt tokens; peak {ours['peak_running']} running, "
            f"{ours['peak_blocks_in_use']} blocks in use"
        )
        print(
            f"{'':>12} {'req':>5} {'fail':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} "
            f"{'p95 s':>7} {'peak GiB':>8}"
        )
        print(
            f"{args.label:>12} {ours['requests']:>5} {ours['failures']:>4} "
            f"{ours['requests_per_s']:>7.2f} {ours['generated_tokens_per_s']:>7.1f} "
            f"{ours['p50_s'] or 0:>7.2f} {ours['p95_s'] or 0:>7.2f} {ours['peak_gpu_gib']:>8.2f}"
        )
        if "baseline" in entry:
            base = entry["baseline"]
            print(
                f"{'generate()':>12} {base['requests']:>5} {'-':>4} {base['requests_per_s']:>7.2f}"
                f" {base['generated_tokens_per_s']:>7.1f}  (estimated from {base['sampled']} "
                f"sampled requests); ratio {entry['requests_per_s_ratio']:.1f}x"
            )
        if order == "helm":
            times = ", ".join(f"{k} {v:.1f} s" for k, v in ours["scenario_seconds"].items())
            print(f"by scenario: {times}; multiple choice {ours['mc_requests_per_s']:.1f} req/s")
            drafted = {
                k: v for k, v in ours["scenario_engine"].items() if v.get("speculation_passes")
            }
            if drafted:
                print(
                    "kept per drafted row and pass, by scenario: "
                    + ", ".join(
                        f"{k} {v['speculation_accepted'] / v['speculation_passes']:.2f} "
                        f"({v['speculation_accepted']} of {v['speculation_drafted']} in "
                        f"{v['speculation_steps']} passes)"
                        for k, v in drafted.items()
                    )
                )
            print("where each scenario's seconds went (engine steps, by what they ran):")
            for name, steps in ours["scenario_steps"].items():
                print(steps_report(name, steps))


if __name__ == "__main__":
    sys.exit(main())
