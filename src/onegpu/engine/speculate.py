"""Prompt-lookup speculation: draft the next tokens from the request's own text, verify them all
in one pass, keep the longest run the model agrees with.

An answer often repeats what came before it (a number from the question, a phrase of the few-shot
examples or of the article it summarizes, its own earlier step), so the tokens that followed the
last occurrence of the current ending are a good guess at the next ones. The model checks k
guesses at once (a decode row of k + 1 positions costs about what one does while the weights'
reads dominate); the first guess that differs from the token the request would take there, and
everything after it, is dropped, so the answer is the one plain decoding gives. For a greedy
request that token is the argmax; for a sampled one it is the token its noise draws at that index
(`sampling`), which depends on nothing the draft changes; a guess is then kept with the
probability the model gives it there, as in speculative sampling with a draft certain of its
guess. Measured on Qwen2.5-Coder-0.5B's greedy GSM8K answers (HELM's 5-shot prompts, the 32 of
40 that stop by themselves): 1.72 tokens per verifying pass with k = 4.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

from onegpu.engine.forward import Row
from onegpu.engine.sequence import Sequence as Running

# Longest and shortest endings looked up, and how far back (tokens) the lookup goes.
MAX_NGRAM = 3
MIN_NGRAM = 1
WINDOW = 2048


def propose(ids: Sequence[int], k: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest ending
    of `ids` (MAX_NGRAM tokens down to MIN_NGRAM); [] when no ending occurred before."""
    if k <= 0:
        return []
    ids = list(ids[-WINDOW:])
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        if len(ids) <= n:
            continue
        ending = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):  # latest first, never the ending itself
            if ids[start : start + n] == ending:
                return ids[start + n : start + n + k]
    return []


def accepted(draft: Sequence[int], chosen: Sequence[int]) -> int:
    """How many of `draft` the model agrees with: the run of draft[i] == chosen[i] from 0
    (chosen[i] is the model's token at the position draft[i] was guessed for)."""
    count = 0
    for guess, token in zip(draft, chosen, strict=False):
        if guess != token:
            break
        count += 1
    return count


class Speculation:
    """Drafts `k` tokens for each greedy request (and each sampled one, with `sampled`) past
    its first tokens, and judges them against the request's choices over the draft; counts what
    was drafted and kept."""

    def __init__(
        self, k: int, width: Callable[[int], int] | None = None, *, sampled: bool = False
    ) -> None:
        self.k = k
        self.sampled = sampled
        # Positions per row a verifying pass over n rows may have (k + 1 when not given).
        self.width = width or (lambda rows: k + 1)
        self.steps = self.passes = self.drafted = self.accepted = 0

    def draft(self, running: Collection[Running]) -> None:
        """Set each eligible sequence's draft (before scheduling: it needs cache room), as long
        as the pass's size allows (none at all beyond it)."""
        if not self.k or not running:
            return
        k = min(self.k, self.width(len(running)) - 1)
        for seq in running:
            request, scored = seq.output.request, len(seq.output.scored)
            left = request.max_new_tokens - scored - 1  # the verifying pass adds one more
            eligible = (
                k > 0
                and seq.decoding
                and (request.greedy or self.sampled)
                and scored >= request.min_new_tokens
            )
            seq.draft = propose(seq.ids, min(k, left)) if eligible else []

    def rows(self, seqs: Iterable[Running]) -> list[Row]:
        """A verifying pass (counted): each sequence's last token and its draft, if any."""
        self.steps += 1
        return [Row(seq.key, [seq.ids[-1], *seq.draft], seq.computed, seq.table) for seq in seqs]

    def judge(self, seq: Running, chosen: Sequence[int]) -> int:
        """How many of `chosen` (the request's own tokens at each position of `seq`'s chunk,
        `scoring.choose_run`) it keeps: those up to the first disagreement with the draft, and
        the one after it."""
        keep = accepted(seq.draft, chosen) + 1
        self.passes += 1
        self.drafted += len(seq.draft)
        self.accepted += keep - 1
        seq.draft = []
        return keep

    def stats(self) -> dict[str, int]:
        return {
            "speculation_steps": self.steps,  # engine passes that verified drafts
            "speculation_passes": self.passes,  # drafts judged (one per sequence and pass)
            "speculation_drafted": self.drafted,
            "speculation_accepted": self.accepted,
        }
