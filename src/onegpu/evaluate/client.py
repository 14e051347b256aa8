"""Items sent to a running `onegpu serve` over HTTP, as HELM sends them: many clients at once.

Standard library only (urllib and threads), like any client a user would point at the server.
A request that fails is recorded with its error, never retried: a measurement counts failures.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from onegpu.evaluate.reference import Answer
from onegpu.evaluate.tasks import Item

TIMEOUT_S = 3000  # HELM's per-request timeout


class ServedError(RuntimeError):
    """The server answered a request with an error status, or not at all."""


def post(base_url: str, path: str, body: dict, *, timeout: float = TIMEOUT_S) -> dict:
    """POST `body` as JSON; the decoded JSON answer. Raises ServedError on anything but 2xx."""
    request = urllib.request.Request(
        base_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServedError(f"{path}: HTTP {exc.code}: {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ServedError(f"{path}: {exc}") from None


def ask(base_url: str, item: Item) -> Answer:
    """One item through /process."""
    started = time.perf_counter()
    body = post(base_url, "/process", item.request())
    tokens = body["tokens"]
    return Answer(
        key=item.key,
        text=body["text"],
        logprob=body["logprob"],
        new_tokens=len(tokens),
        seconds=time.perf_counter() - started,
        token_logprobs=[t["logprob"] for t in tokens],
    )


def ask_all(base_url: str, items: Sequence[Item], *, clients: int) -> dict[str, Answer | str]:
    """Every item from `clients` concurrent clients: its Answer, or the error message."""

    def one(item: Item) -> Answer | str:
        try:
            return ask(base_url, item)
        except ServedError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return {item.key: answer for item, answer in zip(items, pool.map(one, items), strict=True)}


def wait_ready(base_url: str, *, timeout: float) -> None:
    """Wait until GET /health answers 200 (the model is loaded), or raise ServedError."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise ServedError(f"{base_url} was not ready within {timeout:g} s ({last})")
