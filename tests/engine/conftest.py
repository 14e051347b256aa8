"""A scripted language model: emits a fixed token sequence, so stopping can be tested exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import make_engine


class ScriptedLM(torch.nn.Module):
    """Puts `margin` more logit on the next scripted id than on any other; then end-of-text forever.

    It follows the calling convention the engine relies on (input_ids, position_ids, the pass
    description `onegpu_pass`, logits_to_keep) like a real model: prefill passes tell it where
    each sequence's prompt ends, and each position then predicts the script's next id.
    """

    def __init__(self, script: list[int], vocab_size: int, eos_id: int, margin: float = 8.0):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.margin = margin
        self.config = SimpleNamespace(eos_token_id=eos_id)
        self.generation_config = SimpleNamespace(eos_token_id=eos_id)
        self._anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompt_end: dict[int, int] = {}

    def set_attn_implementation(self, name: str) -> None:
        """It has no attention layers: the paged attention is never called."""

    def forward(self, input_ids, position_ids, onegpu_pass, logits_to_keep=0, **_):
        p = onegpu_pass
        if p.decode:
            kept = list(zip(p.keys, position_ids[:, 0].tolist(), strict=True))
            batch = [[item] for item in kept]
        else:
            positions = position_ids[0].tolist()
            starts = p.host_query_start
            owner = []
            for s, key in enumerate(p.keys):
                owner += [key] * (starts[s + 1] - starts[s])
                end = positions[starts[s + 1] - 1] + 1
                self.prompt_end[key] = max(self.prompt_end.get(key, 0), end)
            batch = [[(owner[i], positions[i]) for i in logits_to_keep.tolist()]]
        logits = torch.zeros(len(batch), len(batch[0]), self.vocab_size)
        for b, row in enumerate(batch):
            for t, (key, position) in enumerate(row):
                # Index of the script id this position predicts.
                step = position - self.prompt_end.get(key, position + len(self.script)) + 1
                done = not 0 <= step < len(self.script)
                target = self.config.eos_token_id if done else self.script[step]
                logits[b, t, target] = self.margin
        return SimpleNamespace(logits=logits)


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
