"""Where a scenario's seconds go: every engine step timed, with what it ran.

    with StepTrace(engine) as trace:
        ...                                  # requests served meanwhile
    trace.summary(since, until)              # one scenario's window of `time.perf_counter()`

A step's wall time covers its passes and the wait for the device (each step waits once, when
it scores), so the steps' sum is the engine's busy time and the rest of a window is idle (the
worker waiting for requests, HTTP). Each step is classed by what it ran: a prefill pass (its
prompt tokens), a decode pass (its rows), a verifying pass (its rows; drafted tokens are summed).
The timeline lists the classes in the order they ran, runs of one class folded into one entry
("decode 8 x77"), so a scenario whose last request decodes alone after the others shows it.
Works against an older engine too: only `engine.step` and `engine.forward`'s prefill, decode and
verify methods are wrapped, those it lacks are left alone.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from itertools import groupby


class StepTrace:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.steps: list[dict] = []  # start, seconds, prefill tokens, decode rows, verify rows
        self._now: dict | None = None
        self._saved: list[tuple[object, str, object]] = []  # owner, name, the original

    def __enter__(self) -> StepTrace:
        self._wrap(self.engine, "step", self._step)
        forward = getattr(self.engine, "forward", None)
        if forward is not None:
            self._wrap(forward, "prefill", self._counted("prefill", _prompt_tokens))
            self._wrap(forward, "decode", self._counted("decode", len))
            self._wrap(forward, "verify", self._counted("verify", len))
        return self

    def __exit__(self, *_) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _wrap(self, owner, name: str, make) -> None:
        original = getattr(owner, name, None)
        if original is not None:
            self._saved.append((owner, name, original))
            setattr(owner, name, make(original))

    def _step(self, original):
        def step():
            self._now = {"prefill": 0, "decode": 0, "verify": 0, "drafted": 0}
            start = time.perf_counter()
            try:
                return original()
            finally:
                self._now["start"] = start
                self._now["seconds"] = time.perf_counter() - start
                if any(self._now[k] for k in ("prefill", "decode", "verify")):
                    self.steps.append(self._now)
                self._now = None

        return step

    def _counted(self, kind: str, size):
        def make(original):
            def run(work, *args, **kwargs):
                if self._now is not None:
                    self._now[kind] += size(work)
                    if kind == "verify":
                        self._now["drafted"] += sum(len(row.tokens) - 1 for row in work)
                return original(work, *args, **kwargs)

            return run

        return make

    def summary(self, since: float, until: float) -> dict:
        """The steps that began in [since, until): busy and idle seconds, per class of step its
        count, seconds and median milliseconds, and the timeline of classes."""
        steps = [s for s in self.steps if since <= s["start"] < until]
        names = [_class_of(s) for s in steps]
        classes: dict[str, list[float]] = defaultdict(list)
        for name, s in zip(names, steps, strict=True):
            classes[name].append(s["seconds"])
        busy = sum(s["seconds"] for s in steps)
        return {
            "steps": len(steps),
            "busy_s": busy,
            "idle_s": max(0.0, (until - since) - busy),
            "prefill_tokens": sum(s["prefill"] for s in steps),
            "drafted_tokens": sum(s["drafted"] for s in steps),
            "classes": {
                name: {
                    "steps": len(times),
                    "seconds": sum(times),
                    "median_ms": 1e3 * statistics.median(times),
                }
                for name, times in sorted(classes.items(), key=lambda kv: -sum(kv[1]))
            },
            "timeline": timeline(names),
        }


def timeline(classes: list[str]) -> list[str]:
    """`classes` in order, each run of one class as one entry: "decode 8 x77"."""
    runs = ((name, sum(1 for _ in run)) for name, run in groupby(classes))
    return [name if count == 1 else f"{name} x{count}" for name, count in runs]


def _prompt_tokens(chunks) -> int:
    return sum(len(chunk.tokens) for chunk in chunks)


def _class_of(step: dict) -> str:
    """'prefill 2048+' / 'prefill <512' ..., then ' + decode N' or ' + verify N (D drafted)'."""
    parts = []
    if step["prefill"]:
        tokens = step["prefill"]
        parts.append("prefill " + next(f"<{b}" for b in (64, 512, 1024, 2048, 10**9) if tokens < b))
    if step["decode"]:
        parts.append(f"decode {step['decode']}")
    if step["verify"]:
        parts.append(f"verify {step['verify']}")
    return " + ".join(parts).replace("<1000000000", ">=2048")


def report(name: str, summary: dict) -> str:
    """A few lines for one scenario."""
    lines = [
        f"{name}: {summary['steps']} steps, busy {summary['busy_s']:.2f} s, idle "
        f"{summary['idle_s']:.2f} s, {summary['prefill_tokens']} prompt tokens, "
        f"{summary['drafted_tokens']} drafted"
    ]
    for cls, entry in list(summary["classes"].items())[:8]:
        lines.append(
            f"    {cls:<28} {entry['steps']:>5} steps {entry['seconds']:>6.2f} s "
            f"(median {entry['median_ms']:.2f} ms)"
        )
    order = summary.get("timeline", [])
    shown = order if len(order) <= 12 else [*order[:6], "...", *order[-5:]]
    lines.append("    in order: " + " | ".join(shown))
    return "\n".join(lines)
