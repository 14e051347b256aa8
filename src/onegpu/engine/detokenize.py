"""Incremental detokenizing: per-token text pieces whose concatenation is the decoded text.

Byte-level BPE splits a multi-byte character (emoji, CJK) across tokens; decoding such a token on
its own gives U+FFFD. A piece is held back until the character is complete: the tokens that carry
its first bytes get "" and the token that completes it gets the whole character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

REPLACEMENT = "\ufffd"
# Tokens of context kept before the unread ones, so that decoders that strip a leading space
# (SentencePiece) or merge across tokens see enough on the left.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, one per token.

    `context_ids` are tokens already emitted elsewhere (the prompt): they shape the first piece
    (a leading space) but produce no text themselves.
    """

    def __init__(self, decode: Decode, context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the context window inside _ids
        self._read = len(self._ids)  # tokens up to here have produced their text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""
        piece = after[len(before) :]
        self._prefix = max(self._read, len(self._ids) - _CONTEXT_TOKENS)
        self._read = len(self._ids)
        self._trim()
        return piece

    def flush(self) -> str:
        """Text held back at the end of a stream (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""

    def _trim(self) -> None:
        # Keep memory flat on long generations: drop ids left of the context window.
        if self._prefix > 64:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


def token_pieces(decode: Decode, ids: Sequence[int], context_ids: Sequence[int] = ()) -> list[str]:
    """The text piece of each id in `ids`; the last piece also carries any held-back bytes."""
    detok = IncrementalDetokenizer(decode, context_ids)
    pieces = [detok.push(i) for i in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces
