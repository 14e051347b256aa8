"""Stop sequences matched on decoded text, across token boundaries, and trimming at the stop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopMatcher:
    """Finds where the generated text must end.

    `hard` stops (the caller's stop_sequences) match anywhere. `soft` stops (the server's default
    cut, used when the caller gave none) only match once some non-whitespace text precedes them,
    so that a leading blank line does not leave an empty answer.
    """

    hard: tuple[str, ...] = ()
    soft: tuple[str, ...] = ()

    @property
    def longest(self) -> int:
        return max((len(s) for s in (*self.hard, *self.soft)), default=0)

    def find(self, text: str, since: int = 0) -> int | None:
        """Index in `text` where the earliest stop begins, or None.

        Only matches that end after position `since` are considered: callers pass the text length
        before the latest piece was appended, so each step looks at a short tail only.
        """
        begin = max(0, since - self.longest + 1)
        best: int | None = None
        for stop in self.hard:
            if stop and (i := text.find(stop, begin)) != -1 and (best is None or i < best):
                best = i
        for stop in self.soft:
            if not stop:
                continue
            i = text.find(stop, begin)
            while i != -1 and not text[:i].strip():
                i = text.find(stop, i + 1)
            if i != -1 and (best is None or i < best):
                best = i
        return best


def cut_pieces(pieces: list[str], end: int) -> list[str]:
    """Trim per-token pieces so that their concatenation is the first `end` characters.

    A token that straddles `end` keeps only its text before it; a token left with no text at all
    (it lies wholly inside the stop string or after it) is dropped.
    """
    kept: list[str] = []
    position = 0
    for piece in pieces:
        if position >= end:
            break
        kept.append(piece[: end - position])
        position += len(piece)
    # Empty pieces at the end are bytes of a character that belongs to the stop string.
    while kept and not kept[-1]:
        kept.pop()
    return kept
