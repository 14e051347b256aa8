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

A verifying pass costs more than a plain one (its extra positions), and every row in it pays,
drafted or not. So a step verifies only when its drafts are expected to keep more tokens than
that costs (`worth_verifying`). What a request's drafts keep is estimated as it goes: from each
verified draft, and, while its drafts are not verified, from comparing a held-back draft with
the tokens the request then takes, which costs the device nothing. A request whose guesses
stop matching (a sampled summary on random weights keeps none) soon stops slowing its batch,
and drafts again when its text starts repeating.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from onegpu.engine.forward import Row
from onegpu.engine.sequence import Sequence as Running

# Longest and shortest endings looked up, and how far back (tokens) the lookup goes.
MAX_NGRAM = 3
MIN_NGRAM = 1
WINDOW = 2048


class Lookup:
    """Prompt lookup over one request's text, which only grows: `draft(ids, k)` gives `k`
    tokens that followed the most recent earlier occurrence of the longest ending of `ids`
    (`longest` tokens down to `shortest`, within the last WINDOW tokens); [] when no ending
    occurred before.

    When fewer than `k` follow that occurrence (it is close to the end: the text repeats with a
    short period), the draft goes on repeating the period, as the text would if the loop goes
    on: after 7 7 7 comes 7 7 7, not a single 7.

    Each n-gram's latest start is kept as tokens are read, so a draft costs the same whatever
    the text's length (a search back through 2,048 tokens took 1.7 ms of Python per row and
    step on the CPU: for 10 rows, more than their decode step on an H100).
    """

    def __init__(self, longest: int = MAX_NGRAM, shortest: int = MIN_NGRAM) -> None:
        self.longest, self.shortest = longest, shortest
        self._read = 0  # tokens of the text taken in so far
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence
        self._earlier: dict[int, int] = {}  # n -> start of the n-token ending's previous one

    def draft(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` drafted tokens for the text `ids` (the text read before, grown since)."""
        self._take(ids)
        if k <= 0:
            return []
        end = len(ids)
        for n in range(self.longest, self.shortest - 1, -1):
            start = self._earlier.get(n)
            if start is not None and start >= end - WINDOW:
                after, period = start + n, end - start - n
                return [ids[after + i % period] for i in range(k)]
        return []

    def _take(self, ids: Sequence[int]) -> None:
        end, latest = len(ids), self._latest
        if end == self._read:  # nothing new (a step that did not advance this request)
            return
        for n in range(self.shortest, min(self.longest, end) + 1):
            for start in range(max(self._read - n + 1, 0), end - n):  # new n-grams but the last
                latest[tuple(ids[start : start + n])] = start
            ending = tuple(ids[end - n :])
            earlier = latest.get(ending)
            latest[ending] = end - n
            if earlier is None:
                self._earlier.pop(n, None)
            else:
                self._earlier[n] = earlier
        self._read = end


def worth_verifying(expected: Iterable[float], rows: int, cost: float) -> bool:
    """Whether a verifying pass over `rows` rows that costs `cost` plain passes yields more
    tokens per unit of time than a plain pass: `rows` tokens plus the drafts' `expected` kept
    tokens against `rows` tokens for one pass, i.e. sum(expected) >= (cost - 1) x rows."""
    return sum(expected) >= (cost - 1.0) * rows


def estimate(previous: float, kept: int) -> float:
    """A request's expected kept tokens per draft after its latest draft kept `kept`: a
    running mean that weighs the latest observation WEIGHT."""
    return (1.0 - WEIGHT) * previous + WEIGHT * kept


# A new request's drafts are expected to keep PRIOR tokens per pass (real GSM8K answers kept
# 0.7-1.4 with k = 4); each later draft, verified or held back, moves that by WEIGHT.
PRIOR = 1.0
WEIGHT = 0.5


@dataclass(slots=True)
class _Record:
    """What one request's drafts keep: the running estimate, and a draft held back from a
    plain step, compared token by token with what the request takes next (`matched` so far);
    and the lookup its drafts come from."""

    expected: float = PRIOR
    held: list[int] = field(default_factory=list)
    matched: int = 0
    lookup: Lookup = field(default_factory=Lookup)


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
    its first tokens when the step is worth verifying (always, with `always`), and judges them
    against the request's choices over the draft; counts what was drafted and kept.

    `width(rows)`: positions per row a verifying pass over `rows` rows may have (k + 1 when not
    given); `cost(rows)`: what such a pass costs against a plain one (1 when not given)."""

    def __init__(
        self,
        k: int,
        width: Callable[[int], int] | None = None,
        cost: Callable[[int], float] | None = None,
        *,
        sampled: bool = False,
        always: bool = False,
    ) -> None:
        self.k = k
        self.sampled = sampled
        self.always = always
        self.width = width or (lambda rows: k + 1)
        self.cost = cost or (lambda rows: 1.0)
        self._records: dict[int, _Record] = {}  # by sequence key, for those running
        self.steps = self.passes = self.drafted = self.accepted = self.held = 0

    def draft(self, running: Collection[Running]) -> None:
        """Set each eligible sequence's draft (before scheduling: it needs cache room) when the
        step is worth verifying; else hold the drafts back to compare with what comes."""
        for seq in running:
            seq.draft = []
        if not self.k or not running:
            self._records.clear()
            return
        self._records = {seq.key: self._records.get(seq.key, _Record()) for seq in running}
        k = min(self.k, self.width(len(running)) - 1)
        drafts = {}
        for seq in running:
            request, scored = seq.output.request, len(seq.output.scored)
            left = request.max_new_tokens - scored - 1  # the verifying pass adds one more
            eligible = (
                k > 0
                and seq.decoding
                and (request.greedy or self.sampled)
                and scored >= request.min_new_tokens
            )
            lookup = self._records[seq.key].lookup
            if eligible and (draft := lookup.draft(seq.ids, min(k, left))):
                drafts[seq] = draft
        if not drafts:
            return
        rows = sum(seq.decoding for seq in running)
        expected = (min(self._records[seq.key].expected, len(d)) for seq, d in drafts.items())
        if self.always or worth_verifying(expected, rows, self.cost(rows)):
            for seq, draft in drafts.items():
                seq.draft = draft
                self._records[seq.key].held = []  # this draft's outcome is the one to learn
            return
        self.held += 1
        for seq, draft in drafts.items():
            record = self._records[seq.key]
            if not record.held:
                record.held, record.matched = draft, 0

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
        if (record := self._records.get(seq.key)) is not None:
            record.expected = estimate(record.expected, keep - 1)
        seq.draft = []
        return keep

    def observe(self, seq: Running, token: int) -> None:
        """`seq` took `token` in a plain step: compare it with its held-back draft, if any,
        and learn the draft's outcome once it is known."""
        record = self._records.get(seq.key)
        if record is None or not record.held:
            return
        if token == record.held[record.matched]:
            record.matched += 1
            if record.matched < len(record.held):
                return
        record.expected = estimate(record.expected, record.matched)
        record.held = []

    def stats(self) -> dict[str, int]:
        return {
            "speculation_steps": self.steps,  # engine passes that verified drafts
            "speculation_passes": self.passes,  # drafts judged (one per sequence and pass)
            "speculation_drafted": self.drafted,
            "speculation_accepted": self.accepted,
            "speculation_held": self.held,  # steps whose drafts were not worth verifying
        }
