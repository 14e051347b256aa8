"""A scripted language model: emits a fixed token sequence, so stopping can be tested exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import make_engine


class ScriptedLM(torch.nn.Module):
    """Puts `margin` more logit on the next scripted id than on any other; then end-of-text forever.

    It follows the calling convention the engine relies on (input_ids [B, T], position_ids,
    past_key_values, logits_to_keep) like a real model: a prefill pass (the cache names its row)
    fixes where that row's prompt ends, and each position then predicts the script's next id.
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

    def forward(self, input_ids, position_ids, past_key_values, logits_to_keep=0, **_):
        row = past_key_values.prefill_row
        rows = [row] if row is not None else list(range(input_ids.shape[0]))
        if row is not None:
            self.prompt_end[row] = int(position_ids[0, -1]) + 1
        kept = position_ids[:, -logits_to_keep:] if logits_to_keep else position_ids
        logits = torch.zeros(*kept.shape, self.vocab_size)
        for b, r in enumerate(rows):
            for t, position in enumerate(kept[b].tolist()):
                # Index of the script id this position predicts (rows never prefilled: past it).
                step = position - self.prompt_end.get(r, position + len(self.script)) + 1
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
