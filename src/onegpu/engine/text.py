"""Text <-> token ids for the engine: the tokenizer behind one lock, every id it reports exact.

`encode` is what `/tokenize` answers and what `/process` feeds the model; `decode` checks the
ids a client sends; `raw` and `piece` turn generated ids (bounded by the vocabulary already)
into text, special tokens kept, for incremental detokenizing and top-logprob keys. `eos_ids`
are the ids that end a text, wherever the model's files declare them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache

from onegpu.engine.types import InvalidRequestError


def eos_ids(tokenizer, *configs) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's, and each config's `eos_token_id` (the
    model's config and its generation config may each name one or several)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, *(getattr(c, "eos_token_id", None) for c in configs)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class Text:
    """One tokenizer shared by the engine thread and the server's threads."""

    def __init__(self, tokenizer, vocab_size: int, eos: frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos
        self._lock = threading.Lock()
        self.piece = lru_cache(maxsize=65536)(self._piece)

    def encode(
        self, text: str, *, truncation: bool = False, max_length: int | None = None
    ) -> list[int]:
        """The ids the model sees for `text`, optionally truncated to `max_length`."""
        with self._lock:
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text for `ids`; raises InvalidRequestError for ids outside the vocabulary."""
        return self._decode(self.checked(ids), skip_special_tokens=skip_special_tokens)

    def checked(self, ids: Sequence[int]) -> list[int]:
        """`ids` as a list, or InvalidRequestError naming those outside the vocabulary."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}"
                + (" ..." if len(bad) > 5 else "")
            )
        return list(ids)

    def raw(self, ids: Sequence[int]) -> str:
        """Text for generated ids, special tokens kept (no range check: the model bounds them)."""
        return self._decode(ids, skip_special_tokens=False)

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages` ({"role", "content"} each) by the tokenizer's own chat
        template, ending where the assistant's answer begins."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template")
        try:
            with self._lock:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
        except Exception as exc:  # a template's own checks (roles out of order, ...)
            raise InvalidRequestError(f"the chat template refused the messages: {exc}") from None

    def start_token(self) -> int:
        """What an empty prompt feeds the model: the BOS token, else EOS, else 0."""
        for candidate in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _piece(self, token_id: int) -> str:
        return self.raw([token_id])

    def _decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        with self._lock:
            return self.tokenizer.decode(
                list(ids),
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )
