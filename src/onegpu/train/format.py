"""Prompt templates and tokenization with response-only labels.

A conversation is rendered as segments of text, each marked trained or not: system and user
turns (with the template's cues) are context, assistant replies are what the model learns, followed
by the end-of-text token so that it learns to stop. Each segment is tokenized on its own and the
ids are concatenated; labels are the ids of trained segments and -100 (ignored by the loss)
everywhere else.

The default template, `qa`, ends the context with "Answer:" and starts the reply with a space, the
way HELM's prompts do ("Question: ...\\nA. ...\\nAnswer: B"): the server sends HELM's raw prompt
text to the model, so an adapter should learn answers in the shape it will be asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from onegpu.train.sources import Conversation

IGNORE_INDEX = -100  # the label torch's cross-entropy skips


@dataclass(frozen=True, slots=True)
class Template:
    """How each role's text is wrapped. `{content}` is the message text."""

    name: str
    system: str  # context
    user: str  # context: the question and the cue that precedes the answer
    assistant: str  # trained
    separator: str  # context: between a reply and the next turn
    eos: bool = True  # train the tokenizer's end-of-text token after each reply

    def render(self, conv: Conversation) -> list[tuple[str, bool]]:
        """(text, trained) segments of a conversation, in order."""
        segments: list[tuple[str, bool]] = []
        after_reply = False
        for message in conv.messages:
            if message.role == "assistant":
                segments.append((self.assistant.format(content=message.content), True))
                after_reply = True
                continue
            fmt = self.system if message.role == "system" else self.user
            text = (self.separator if after_reply else "") + fmt.format(content=message.content)
            segments.append((text, False))
            after_reply = False
        return segments


TEMPLATES: dict[str, Template] = {
    "qa": Template(
        "qa",
        system="{content}\n\n",
        user="Question: {content}\nAnswer:",
        assistant=" {content}",
        separator="\n\n",
    ),
    "alpaca": Template(
        "alpaca",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n### Response:\n",
        assistant="{content}",
        separator="\n\n",
    ),
    # Qwen's chat format; a reply ends with <|im_end|> (a special token), not end-of-text.
    "chatml": Template(
        "chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        separator="\n",
        eos=False,
    ),
    # Text as is: for data whose prompts already end with their own cue.
    "plain": Template(
        "plain", system="{content}\n\n", user="{content}", assistant="{content}", separator="\n\n"
    ),
}


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """Token ids and labels of one conversation ([T] each); labels are -100 outside replies."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text (e.g. Llama's BOS; none for Qwen).

    The engine tokenizes prompts with special tokens, so training examples start the same way.
    """
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def tokenize(
    conv: Conversation,
    tokenizer,
    template: Template,
    *,
    max_length: int,
    prefix: list[int] | None = None,
) -> TokenizedExample | None:
    """Ids and response-only labels of `conv`, cut to `max_length`; None if no reply token is left.

    The first token's label is always ignored: nothing before it in the example predicts it (and
    in a packed row, the previous example must not be trained to predict it).
    """
    ids = list(special_prefix(tokenizer) if prefix is None else prefix)
    labels = [IGNORE_INDEX] * len(ids)
    for text, trained in template.render(conv):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if trained and template.eos:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no end-of-text token for the reply's end")
            piece.append(tokenizer.eos_token_id)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    example = TokenizedExample(ids, labels, conv.source)
    return example if example.n_targets else None
