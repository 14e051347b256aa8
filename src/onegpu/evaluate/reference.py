"""The reference answers: transformers' own `generate()` on the same prompts, one at a time.

What the server promises is reproduced with transformers' options, not with onegpu's code:
greedy decoding, end-of-text impossible on the first token (`min_new_tokens=1`), generation
stopped at a stop sequence (`stop_strings`) and the text cut before it, and the raw
log-probabilities of the tokens kept (from `output_logits`).

With `reuse_prefix`, the keys and values of the tokens a prompt shares with the previous one (the
in-context examples of a scenario) are handed to `generate()` as its cache, transformers' own
prefix caching, instead of being computed again: the same answers up to float rounding, several
times faster on a CPU.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onegpu.evaluate.tasks import Item

# Shared prompt tokens below which the cache is not worth copying.
MIN_SHARED = 32


@dataclass
class Answer:
    """One completion, from the server or the reference."""

    key: str
    text: str
    logprob: float  # the sum over the tokens kept
    new_tokens: int
    seconds: float
    token_logprobs: list[float] = field(default_factory=list)


def cut(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the first of `stops` (the stop itself removed)."""
    ends = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(ends)] if ends else text


class Reference:
    """A model folder loaded by transformers as it is, answering items one by one."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        reuse_prefix: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.reuse_prefix = reuse_prefix
        self._last: tuple[list[int], object] | None = None  # the last prompt's ids and cache

    def _cache_for(self, ids: list[int]):
        """A cache holding the longest prefix `ids` shares with the last prompt (None: no reuse)."""
        if not self.reuse_prefix or self._last is None:
            return None
        last_ids, last_cache = self._last
        shared = 0
        for a, b in zip(ids[:-1], last_ids, strict=False):  # at least one token is fed
            if a != b:
                break
            shared += 1
        if shared < MIN_SHARED:
            return None
        cache = copy.deepcopy(last_cache)
        cache.crop(shared - cache.get_seq_length())  # drop what is not shared
        return cache

    @torch.no_grad()
    def answer(self, item: Item) -> Answer:
        started = time.perf_counter()
        prompt = self.tokenizer(item.prompt)["input_ids"]
        ids = torch.tensor([prompt], device=self.device)
        extra: dict = {}
        if item.stop_sequences:
            extra = {"stop_strings": list(item.stop_sequences), "tokenizer": self.tokenizer}
        if (cache := self._cache_for(prompt)) is not None:
            extra["past_key_values"] = cache
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=item.max_new_tokens,
            min_new_tokens=1,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **extra,
        )
        if self.reuse_prefix:
            self._last = (prompt, out.past_key_values)
        new = out.sequences[0, ids.shape[1] :].tolist()
        logprobs = [
            torch.log_softmax(step[0].float(), dim=-1)[token].item()
            for step, token in zip(out.logits, new, strict=False)
        ]
        eos = set(_eos_ids(self.model, self.tokenizer))
        if new and new[-1] in eos:  # end-of-text is not returned, as the server does not
            new, logprobs = new[:-1], logprobs[:-1]
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        kept = cut(text, item.stop_sequences)
        # The server keeps each token whose text starts before the cut (trimmed at the cut).
        count = len(new)
        if kept != text:
            starts = [len(self.tokenizer.decode(new[:i])) for i in range(len(new))]
            count = sum(1 for start in starts if start < len(kept))
        return Answer(
            key=item.key,
            text=kept,
            logprob=sum(logprobs[:count]),
            new_tokens=len(new),
            seconds=time.perf_counter() - started,
            token_logprobs=logprobs[:count],
        )


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for value in (
        tokenizer.eos_token_id,
        getattr(model.generation_config, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return ids
