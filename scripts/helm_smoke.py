#!/usr/bin/env python3
"""Drive the real HELM client (crfm-helm 0.5.16) against a live onegpu server and check the result.

Run with the HELM venv made by scripts/setup-helm-venv:

    .venv-helm/bin/python scripts/helm_smoke.py --base-url http://127.0.0.1:8080 --output-dir DIR

It runs `helm-run` (suite `smoke`, `--disable-cache`) with HELM_HTTP_MODEL_BASE_URL set, reads the
run files HELM wrote under OUTPUT_DIR/runs/SUITE/, prints a summary and exits non-zero when:
  - helm-run exited non-zero (in 0.5.16 any request that still fails after HELM's 5 tries aborts its
    whole run entry: no run files, "Failed runs: [...]", exit 1),
  - no run spec / no request was produced,
  - any run entry lacks its output files, or any request in scenario_state.json has success=false,
  - /tokenize or /decode failed (HELM swallows those: the prompt silently counts as 0 tokens), seen
    in the helm-run log or as num_prompt_tokens == 0,
  - HELM had to retry any request at all (a non-2xx or dropped connection), unless --allow-retries.
A quick preflight (one /tokenize and one /process with HELM-shaped bodies) runs first so a broken
server fails in seconds instead of after HELM's 150 s of retry back-off; --no-preflight skips it.

Stdlib only (plus crfm-helm, run as a subprocess). Exit codes: 0 ok, 1 check failed, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_RUN_ENTRY = "synthetic_reasoning:mode=pattern_match,model=neurips/local"
RUN_FILES = (
    "run_spec.json",
    "scenario.json",
    "scenario_state.json",
    "stats.json",
    "per_instance_stats.json",
)
# Main metric per run: the first of these present (HELM stat names).
MAIN_METRICS = (
    "exact_match",
    "quasi_exact_match",
    "final_number_exact_match",
    "math_equiv",
    "math_equiv_chain_of_thought",
    "rouge_2",
    "prefix_exact_match",
    "f1_score",
)
# Log lines that mean the tokenizer endpoints failed for good (HELM carries on with 0 tokens / "").
TOKENIZER_FAILURE_PATTERNS = (
    "Failed to tokenize after retrying",
    "Failed to decode after retrying",
)
# One line per failed attempt that HELM retried (any endpoint):
#   "Request failed. Retrying (attempt #2) in 10 seconds..."
RETRY_PATTERN = "Retrying (attempt #"


def log(msg: str) -> None:
    print(f"[helm_smoke] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base-url",
        required=True,
        help="server root, e.g. http://127.0.0.1:8080 (HELM appends /process etc.)",
    )
    p.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        help="HELM output path (-o); runs land in OUTPUT_DIR/runs/SUITE/",
    )
    p.add_argument("--max-eval-instances", type=int, default=10)
    p.add_argument("--threads", type=int, default=4, help="helm-run -n (the challenge used 30)")
    p.add_argument(
        "--run-entries",
        nargs="+",
        default=[DEFAULT_RUN_ENTRY],
        help=f"helm-run --run-entries (default: {DEFAULT_RUN_ENTRY!r})",
    )
    p.add_argument(
        "--conf-paths",
        nargs="+",
        default=[],
        help="helm-run --conf-paths (run-entry .conf files), in addition to --run-entries",
    )
    p.add_argument("--suite", default="smoke")
    p.add_argument("--summarize", action="store_true", help="also run helm-summarize on the suite")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds before helm-run is killed (default 3600)",
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the quick /tokenize + /process check before helm-run",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="no network for helm-run: HF_*_OFFLINE=1 and an empty NLTK punkt_tab placeholder "
        "(stops HELM's nltk.download; fine for exact-match tasks, not for BLEU/ROUGE ones)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the summary as JSON here (default OUTPUT_DIR/smoke_summary.json)",
    )
    p.add_argument(
        "--allow-retries",
        action="store_true",
        help="do not fail when HELM had to retry a request that then succeeded",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="echo helm-run's log as it runs")
    a = p.parse_args(argv)
    if not a.run_entries and not a.conf_paths:
        p.error("give --run-entries and/or --conf-paths")
    if a.max_eval_instances < 1 or a.threads < 1:
        p.error("--max-eval-instances and --threads must be >= 1")
    a.base_url = a.base_url.rstrip("/")
    return a


# --------------------------------------------------------------------------- preflight


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # raises HTTPError on non-2xx
        return json.loads(resp.read())


def preflight(base_url: str, timeout: float = 600.0) -> list[str]:
    """One request per endpoint shaped exactly like HELM's; returns problems found."""
    problems: list[str] = []
    try:
        r = _post(
            f"{base_url}/tokenize",
            {"text": "Rules: X * | Result: kiwi\nTarget:", "truncation": False, "max_length": 2048},
            timeout,
        )
        if not isinstance(r.get("tokens"), list) or not r["tokens"]:
            problems.append(f"/tokenize returned no token list: {r!r:.200}")
        if "request_time" not in r:
            problems.append("/tokenize response lacks request_time (HELM reads it)")
    except (urllib.error.URLError, OSError, ValueError) as e:
        problems.append(f"/tokenize failed: {e}")
    try:
        r = _post(
            f"{base_url}/process",
            {
                "prompt": "Rules: X * | Result: kiwi\nTarget:",
                "temperature": 1e-7,
                "num_return_sequences": 1,
                "max_new_tokens": 5,
                "top_p": 1,
                "echo_prompt": False,
                "top_k_per_token": 1,
                "stop_sequences": ["\n"],
            },
            timeout,
        )
        for key in ("text", "tokens", "logprob", "request_time"):
            if key not in r:
                problems.append(f"/process response lacks {key!r} (HELM reads it)")
        for t in r.get("tokens") or []:
            if "text" not in t or "logprob" not in t:
                problems.append(f"/process token lacks text/logprob: {t!r:.200}")
                break
    except (urllib.error.URLError, OSError, ValueError) as e:
        problems.append(f"/process failed: {e}")
    return problems


# --------------------------------------------------------------------------- running HELM


def helm_command(name: str, module: str) -> list[str]:
    """The console script beside this interpreter, else `python -m module`."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: float, verbose: bool) -> int:
    """Run cmd in its own process group, output to log_path; returns exit code (124 on timeout)."""
    log(f"$ {' '.join(cmd)}  (log: {log_path})")
    timed_out = threading.Event()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if verbose:
                    sys.stderr.write(line)
            rc = proc.wait()
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        log(f"{cmd[0]} ran past {timeout:.0f}s; killed it")
        return 124
    return rc


# --------------------------------------------------------------------------- reading results


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def summarize_run(run_dir: Path) -> dict:
    """Counts and means for one run directory (runs/SUITE/RUN_NAME)."""
    s: dict = {"run": run_dir.name, "problems": []}
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        s["problems"].append(f"missing {', '.join(missing)} (the run entry failed)")
        return s

    state = json.loads((run_dir / "scenario_state.json").read_text())
    states = state.get("request_states", [])
    failed = [rs for rs in states if not (rs.get("result") or {}).get("success", False)]
    s["requests"] = len(states)
    s["failed_requests"] = len(failed)
    s["instances"] = len({rs["instance"].get("id") for rs in states})
    s["prompt_truncated"] = sum(1 for rs in states if rs.get("prompt_truncated"))
    s["errors"] = sorted({str((rs.get("result") or {}).get("error")) for rs in failed})[:5]
    empty = sum(
        1
        for rs in states
        if (rs.get("result") or {}).get("success")
        and not any(c.get("text") for c in rs["result"].get("completions", []))
    )
    s["empty_completions"] = empty

    # Per-instance stats, unperturbed only: {stat name: [values]}.
    per: dict[str, list[float]] = {}
    for entry in json.loads((run_dir / "per_instance_stats.json").read_text()):
        if entry.get("perturbation"):
            continue
        for st in entry.get("stats", []):
            name = st["name"]
            if name.get("perturbation"):
                continue
            per.setdefault(name["name"], []).append(st.get("mean"))
    s["num_prompt_tokens"] = _mean(per.get("num_prompt_tokens", []))
    s["num_completion_tokens"] = _mean(per.get("num_completion_tokens", []))
    s["inference_runtime"] = _mean(per.get("inference_runtime", []))
    zero_prompt = sum(1 for v in per.get("num_prompt_tokens", []) if v == 0)
    s["zero_token_prompts"] = zero_prompt
    s["metrics"] = {m: _mean(per[m]) for m in MAIN_METRICS if m in per}
    s["main_metric"] = next(iter(s["metrics"]), None)

    if not states:
        s["problems"].append("no requests")
    if failed:
        s["problems"].append(f"{len(failed)} failed request(s): {s['errors']}")
    if zero_prompt:
        s["problems"].append(f"{zero_prompt} prompt(s) counted as 0 tokens (/tokenize failing?)")
    return s


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def print_summary(runs: list[dict]) -> None:
    for s in runs:
        print(f"run {s['run']}")
        if "requests" not in s:
            print(f"  FAILED: {'; '.join(s['problems'])}")
            continue
        metric = s["main_metric"]
        mline = ", ".join(f"{k}={_fmt(v, 3)}" for k, v in s["metrics"].items()) or "n/a"
        print(
            f"  instances={s['instances']} requests={s['requests']} "
            f"failed_requests={s['failed_requests']} empty_completions={s['empty_completions']} "
            f"prompt_truncated={s['prompt_truncated']}"
        )
        print(
            f"  mean prompt tokens={_fmt(s['num_prompt_tokens'], 1)} "
            f"mean completion tokens={_fmt(s['num_completion_tokens'], 1)} "
            f"mean request time={_fmt(s['inference_runtime'], 3)}s"
        )
        print(
            f"  main metric {metric}={_fmt(s['metrics'].get(metric), 3) if metric else 'n/a'}"
            f"  ({mline})"
        )
        for prob in s["problems"]:
            print(f"  PROBLEM: {prob}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out: Path = a.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    suite_dir = out / "runs" / a.suite
    summary_path = a.json or (out / "smoke_summary.json")
    t0 = time.monotonic()

    if not a.no_preflight:
        problems = preflight(a.base_url)
        if problems:
            for prob in problems:
                log(f"preflight: {prob}")
            log("preflight failed; not starting helm-run (use --no-preflight to run it anyway)")
            return 1
        log("preflight ok (/tokenize, /process)")

    # This script owns OUTPUT_DIR/runs/SUITE: stale run files from an earlier run must not pass.
    if suite_dir.exists():
        log(f"removing previous results in {suite_dir}")
        shutil.rmtree(suite_dir)

    env = dict(os.environ)
    env["HELM_HTTP_MODEL_BASE_URL"] = a.base_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    if a.offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # HELM's metrics import calls nltk.download("punkt_tab") unless nltk.data.find() sees it.
        # An empty placeholder stops that network call; only BLEU/ROUGE-style metrics need the
        # real data (and their scenarios need downloads anyway).
        nltk_dir = out / "nltk_data"
        (nltk_dir / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
        env["NLTK_DATA"] = str(nltk_dir)

    cmd = helm_command("helm-run", "helm.benchmark.run") + [
        "--suite",
        a.suite,
        "-o",
        str(out),
        "--local-path",
        str(out / "prod_env"),
        "--max-eval-instances",
        str(a.max_eval_instances),
        "-n",
        str(a.threads),
        "--disable-cache",
    ]
    if a.run_entries:
        cmd += ["--run-entries", *a.run_entries]
    if a.conf_paths:
        cmd += ["--conf-paths", *[str(Path(c).resolve()) for c in a.conf_paths]]
    helm_log = out / f"helm-run.{a.suite}.log"
    rc = run_logged(cmd, env, helm_log, a.timeout, a.verbose)
    log_text = helm_log.read_text(errors="replace")
    helm_s = time.monotonic() - t0

    problems: list[str] = []
    if rc != 0:
        problems.append(f"helm-run exited {rc}")
    m = re.search(r"(\d+) entries produced (\d+) run specs", log_text)
    n_specs = int(m.group(2)) if m else None
    if n_specs == 0:
        problems.append("helm-run produced no run specs")
    failed_runs = re.search(r"RunnerError: Failed runs: \[(.*)\]", log_text)
    if failed_runs:
        problems.append(f"HELM reports failed runs: {failed_runs.group(1)}")
    tok_fail = {p: log_text.count(p) for p in TOKENIZER_FAILURE_PATTERNS if p in log_text}
    if tok_fail:
        problems.append(
            f"/tokenize or /decode failed for good (HELM went on with 0 tokens): {tok_fail}"
        )
    retries = log_text.count(RETRY_PATTERN)
    if retries:
        errs = sorted(
            {
                e.split(" Request: ")[0][:160]
                for e in re.findall(r"(?:Local Model error|Request error): (.*)", log_text)
            }
        )[:3]
        msg = (
            f"{retries} failed attempt(s) that HELM retried (each costs 2-80 s of back-off): {errs}"
        )
        if a.allow_retries:
            log(f"warning: {msg}")
        else:
            problems.append(msg)

    run_dirs = (
        sorted(d for d in suite_dir.glob("*") if d.is_dir() and d.name != "eval_cache")
        if suite_dir.is_dir()
        else []
    )
    runs = [summarize_run(d) for d in run_dirs]
    if n_specs is not None and len(run_dirs) < n_specs:
        problems.append(f"{n_specs} run spec(s) but only {len(run_dirs)} run dir(s)")
    total_requests = sum(s.get("requests", 0) for s in runs)
    total_failed = sum(s.get("failed_requests", 0) for s in runs)
    if total_requests == 0:
        problems.append("no request result was recorded")
    for s in runs:
        problems += [f"{s['run']}: {p}" for p in s["problems"]]

    summarize_rc = None
    if a.summarize and rc == 0:
        scmd = helm_command("helm-summarize", "helm.benchmark.presentation.summarize") + [
            "--suite",
            a.suite,
            "-o",
            str(out),
        ]
        summarize_rc = run_logged(
            scmd, env, out / f"helm-summarize.{a.suite}.log", a.timeout, a.verbose
        )
        if summarize_rc != 0:
            problems.append(f"helm-summarize exited {summarize_rc}")
        else:
            log(f"helm-summarize wrote {out / 'runs' / a.suite / 'groups'}")

    print_summary(runs)
    ok = not problems
    print(
        f"helm smoke: {'OK' if ok else 'FAILED'}: {len(runs)} run(s), {total_requests} request(s), "
        f"{total_failed} failed, {retries} retried attempt(s), helm-run rc={rc}, {helm_s:.0f}s"
    )
    for prob in problems:
        print(f"  - {prob}")
    if not ok:
        tail = [ln for ln in log_text.splitlines() if ln.strip()][-25:]
        print(f"--- last lines of {helm_log} ---", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)

    summary = {
        "ok": ok,
        "helm_run_rc": rc,
        "helm_summarize_rc": summarize_rc,
        "run_specs": n_specs,
        "requests": total_requests,
        "failed_requests": total_failed,
        "retried_attempts": retries,
        "problems": problems,
        "runs": runs,
        "helm_log": str(helm_log),
        "seconds": round(helm_s, 1),
        "base_url": a.base_url,
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
