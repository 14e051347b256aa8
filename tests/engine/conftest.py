"""A scripted language model: emits a fixed token sequence, so stopping can be tested exactly."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import make_engine


@dataclass
class _Cache:
    length: int


class ScriptedLM(torch.nn.Module):
    """Puts `margin` more logit on the next scripted id than on any other; then end-of-text forever.

    It follows the calling convention the engine relies on (input_ids, past_key_values,
    use_cache, logits_to_keep) and counts positions through its cache like a real model.
    """

    def __init__(self, script: list[int], vocab_size: int, eos_id: int, margin: float = 8.0):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.margin = margin
        self.config = SimpleNamespace(eos_token_id=eos_id)
        self.generation_config = SimpleNamespace(eos_token_id=eos_id)
        self._anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        seen = past_key_values.length if past_key_values is not None else 0
        if past_key_values is None:
            self.prompt_len = input_ids.shape[1]
        length = seen + input_ids.shape[1]
        # Only the kept positions get logits ([1, kept, V]), as in transformers.
        first = length - logits_to_keep if logits_to_keep else seen
        logits = torch.zeros(1, length - first, self.vocab_size)
        for row, position in enumerate(range(first, length)):
            step = position - self.prompt_len + 1  # index of the token this position predicts
            target = self.script[step] if 0 <= step < len(self.script) else self.config.eos_token_id
            logits[0, row, target] = self.margin
        return SimpleNamespace(logits=logits, past_key_values=_Cache(length))


@pytest.fixture
def scripted(qwen_tokenizer):
    """Build an engine whose model will generate exactly the given texts' tokens, in order."""

    def build(*texts_or_ids, default_stop=("\n\n",)):
        script: list[int] = []
        for item in texts_or_ids:
            script += [item] if isinstance(item, int) else qwen_tokenizer.encode(item)
        model = ScriptedLM(script, vocab_size=len(qwen_tokenizer), eos_id=151643)
        return make_engine(model, qwen_tokenizer, default_stop=default_stop)

    return build
