"""Load test: N concurrent clients with HELM-shaped requests for a fixed time, on loopback only.

    python bench/load.py --minutes 3                       # starts `onegpu serve` (embedded model)
    python bench/load.py --base-url http://127.0.0.1:8080  # an already running server
    python bench/load.py --serve-args "--model M --deterministic --gpu-memory-gib 24"
    python bench/load.py --pressure --minutes 5 --serve-args "--model M --gpu-memory-gib 24"

Every client loops over a mix of request shapes (1-token multiple choice with 5 alternatives,
64 tokens with no stop, a "\\n\\n" stop, sampling at temperature 0.3 with a seed, echo with no new
tokens). Greedy and seeded requests are deterministic, so each answer is compared with the first
answer seen for the same body (see `compare`): an answer that differs from its first token, or
whose logprobs disagree, was mixed up; one that agrees and later parts at a near-tie (fp16
rounding in another batch) is counted apart as diverged; any answer not bit-identical to the
first (text and every logprob) is counted as inexact, which `--deterministic` must keep at 0. The
server's resident memory is sampled every few seconds (when this script started it). Prints a
table last and writes load.json to --out. Bounded in time and count; it only talks to the URL it
is given.

`--pressure` keeps the KV cache full instead: GSM-shaped requests (one long shared prompt, 400
tokens), summary-shaped ones (a unique long article each, 128 sampled tokens) and prompts near
the context window, sized in tokens through the server's own /tokenize. A share of the clients
(`--disconnect`) give up at a random moment, as a client that disconnects does. After the run it
waits for the engine to drain and reads /metrics: preemptions, positions recomputed, and the
KV blocks still held (0 when every block came back; cached ones are not held).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

QUESTIONS = [
    "Which planet is known as the red planet?",
    "What is the boiling point of water at sea level in Celsius?",
    "Who wrote the play Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "How many legs does a spider have?",
    "What gas do plants absorb from the air?",
]


# Every key HELM's client sends with each /process body (temperature 0 arrives as 1e-7).
HELM_DEFAULTS = {
    "temperature": 1e-7,
    "num_return_sequences": 1,
    "top_p": 1,
    "echo_prompt": False,
    "top_k_per_token": 1,
    "stop_sequences": [],
}


def bodies() -> list[dict]:
    """The request shapes HELM sends in the challenge's tasks (all keys present, as HELM does)."""
    base = HELM_DEFAULTS
    out = []
    for i, q in enumerate(QUESTIONS):
        mc = f"Question: {q}\nA. one\nB. two\nC. three\nD. four\nAnswer:"
        out.append({**base, "prompt": mc, "max_new_tokens": 1, "top_k_per_token": 5})
        out.append({**base, "prompt": f"Q: {q}\nA:", "max_new_tokens": 64})
        out.append(
            {**base, "prompt": f"Q: {q}\nA:", "max_new_tokens": 40, "stop_sequences": ["\n\n"]}
        )
        out.append(
            {
                **base,
                "prompt": f"Summarize: {q}\n###\n",
                "max_new_tokens": 24,
                "temperature": 0.3,
                "seed": i,
                "stop_sequences": ["###"],
            }
        )
        out.append({**base, "prompt": q, "max_new_tokens": 0, "echo_prompt": True})
    return out


WORDS = [
    "the", "river", "market", "tower", "garden", "winter", "signal", "copper", "engine", "harbor",
    "valley", "silver", "morning", "station", "letter", "bridge", "forest", "window", "candle",
    "number", "orange", "planet", "thunder", "journey", "ladder",
]  # fmt: skip


def sized(http: httpx.Client, text: str, tokens: int) -> str:
    """`text` cut to `tokens` tokens of the served model (its /tokenize, then /decode)."""
    ids = http.post("/tokenize", json={"text": text, "truncation": False}).json()["tokens"]
    return http.post("/decode", json={"tokens": ids[:tokens]}).json()["text"]


def pressure_bodies(http: httpx.Client, window: int = 2048) -> list[dict]:
    """Long prompts and long answers, HELM-shaped, sized for a `window`-token context."""
    rng = random.Random(0)

    def prose(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    base = HELM_DEFAULTS
    shots = sized(http, prose(1400), 900)  # one few-shot block, shared as HELM's is
    out = []
    for _ in range(4):
        prompt = f"{shots}\n\nQ: {prose(40)}?\nA:"
        out.append({**base, "prompt": prompt, "max_new_tokens": 400, "stop_sequences": ["\n\n"]})
    for i in range(4):
        article = sized(http, prose(1400), 917)
        out.append(
            {**base, "prompt": f"{article}\nSummarize the above.\n###\n", "max_new_tokens": 128,
             "temperature": 0.3, "seed": i, "stop_sequences": ["###"]}
        )  # fmt: skip
    for _ in range(4):
        long = sized(http, prose(2400), window - 250)
        out.append({**base, "prompt": long, "max_new_tokens": 200})
    return out


def engine_counters(http: httpx.Client) -> dict[str, float]:
    """The engine's gauges from /metrics (running, preemptions, recomputed, blocks, memory)."""
    counters = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("onegpu_") and " " in line:
            name, value = line.rsplit(" ", 1)
            counters[name] = float(value)
    return counters


def drained(http: httpx.Client, timeout: float = 120.0) -> dict[str, float]:
    """The counters once no request runs (cancellations take a step or two to land)."""
    deadline = time.monotonic() + timeout
    while True:
        counters = engine_counters(http)
        if counters.get("onegpu_running_requests", 0) == 0 or time.monotonic() > deadline:
            return counters
        time.sleep(0.5)


def compare(first: list[tuple[str, float]], again: list[tuple[str, float]], tol: float) -> str:
    """'same', 'diverged' or 'mixed' for two answers to one deterministic body.

    A mixed-up answer belongs to another prompt: it differs from the first token on, or its
    logprobs disagree before the texts part. Two answers that agree token by token (logprobs
    within `tol`) and then part at a near-tie are the same request under other float rounding
    (another batch, another attention length, a reused prefix): 'diverged', reported apart.
    """
    for k, ((text_a, lp_a), (text_b, lp_b)) in enumerate(zip(first, again, strict=False)):
        if text_a != text_b:
            return "mixed" if k == 0 else "diverged"
        if abs(lp_a - lp_b) > tol:
            return "mixed"
    return "same" if len(first) == len(again) else "diverged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server at {url} did not become ready in {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server (default: start one here)")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--serve-args", default="", help="extra `onegpu serve` flags")
    parser.add_argument("--pressure", action="store_true", help="fill the KV cache (see above)")
    parser.add_argument(
        "--disconnect", type=float, default=None, help="share of requests given up (pressure: 0.2)"
    )
    parser.add_argument(
        "--logprob-tolerance",
        type=float,
        default=0.02,
        help="logprob difference still counted as the same answer (fp16 steps are ~0.004 at -7)",
    )
    args = parser.parse_args()

    server = None
    url = args.base_url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "onegpu.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                *shlex.split(args.serve_args),
            ],
            start_new_session=True,
        )
    try:
        wait_ready(url, timeout=900)
        return run(url, server, args)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)


def run(url: str, server: subprocess.Popen | None, args: argparse.Namespace) -> int:
    with httpx.Client(base_url=url, timeout=600) as http:
        mix = pressure_bodies(http) if args.pressure else bodies()
    leave = args.disconnect if args.disconnect is not None else (0.2 if args.pressure else 0.0)
    lock = threading.Lock()
    first: dict[int, tuple] = {}
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    mixed: list[int] = []
    diverged: list[int] = []
    inexact: list[int] = []
    memory: list[int] = []
    stop_at = time.monotonic() + args.minutes * 60
    count = 0

    def client(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=600) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if count >= args.max_requests:
                        return
                    count += 1
                index = rng.randrange(len(mix))
                started = time.perf_counter()
                give_up = rng.uniform(0.2, 5.0) if rng.random() < leave else None
                try:
                    response = http.post("/process", json=mix[index], timeout=give_up or 600)
                    outcome = str(response.status_code)
                except httpx.TimeoutException as exc:
                    response = None
                    outcome = "disconnected" if give_up else type(exc).__name__
                except httpx.HTTPError as exc:
                    response, outcome = None, type(exc).__name__
                seconds = time.perf_counter() - started
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    if response is not None and response.status_code == 200:
                        latencies.append(seconds)
                        body = response.json()
                        tokens = [(t["text"], t["logprob"]) for t in body["tokens"]]
                        first.setdefault(index, tokens)
                        verdict = compare(first[index], tokens, args.logprob_tolerance)
                        if tokens != first[index]:
                            inexact.append(index)
                        if verdict == "mixed":
                            mixed.append(index)
                        elif verdict == "diverged":
                            diverged.append(index)

    def sample_memory() -> None:
        while time.monotonic() < stop_at and server is not None:
            if (rss := rss_bytes(server.pid)) is not None:
                memory.append(rss)
            time.sleep(5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sample_memory, daemon=True))
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join()
    elapsed = time.monotonic() - started
    with httpx.Client(base_url=url, timeout=60) as http:
        counters = drained(http)
    ok = outcomes.get("200", 0)
    failures = sum(n for k, n in outcomes.items() if k not in ("200", "disconnected"))
    result = {
        "url": url,
        "clients": args.clients,
        "seconds": elapsed,
        "requests": sum(outcomes.values()),
        "outcomes": outcomes,
        "failures": failures,
        "disconnected": outcomes.get("disconnected", 0),
        "preemptions": counters.get("onegpu_preemptions"),
        "recomputed_tokens": counters.get("onegpu_recomputed_tokens"),
        "blocks_in_use_after": counters.get('onegpu_kv_blocks{state="in_use"}'),
        "blocks_cached_after": counters.get('onegpu_kv_blocks{state="cached"}'),
        "gpu_peak_gib": counters.get('onegpu_gpu_memory_bytes{kind="peak"}', 0) / 2**30,
        "mixed_up": len(mixed),
        "diverged_after_agreeing": len(diverged),
        "not_bit_identical": len(inexact),
        "logprob_tolerance": args.logprob_tolerance,
        "requests_per_s": ok / elapsed,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 20 else None,
        "rss_first_mib": memory[0] / 2**20 if memory else None,
        "rss_last_mib": memory[-1] / 2**20 if memory else None,
        "rss_max_mib": max(memory) / 2**20 if memory else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"\n{result['requests']} requests from {args.clients} clients in {elapsed:.0f} s: "
        f"{failures} failed, {result['disconnected']} disconnected, {len(mixed)} mixed up, "
        f"{len(diverged)} diverged after agreeing, {len(inexact)} not bit-identical, "
        f"{result['requests_per_s']:.2f} req/s; {result['preemptions']:.0f} preemptions, "
        f"{result['recomputed_tokens']:.0f} positions recomputed, "
        f"{result['blocks_in_use_after']:.0f} blocks held after"
    )
    return 1 if failures or mixed or result["blocks_in_use_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
