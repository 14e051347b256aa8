"""Templates and response-only labels, on the real Qwen tokenizer."""

import copy

import pytest

from onegpu.train.format import IGNORE_INDEX, TEMPLATES, special_prefix, tokenize
from onegpu.train.sources import Conversation, Message

# Replaced by the tokenizer's own end-of-text token (<|im_end|> in these Qwen2.5 files).
EOS = "{eos}"


def conv(*pairs) -> Conversation:
    return Conversation(tuple(Message(role, text) for role, text in pairs))


def spans(ids, labels, trained: bool) -> list[list[int]]:
    """Maximal runs of ids whose label is (trained) or is not (context) learned."""
    out: list[list[int]] = []
    previous = None
    for i, label in zip(ids, labels, strict=True):
        state = label != IGNORE_INDEX
        if state == trained:
            if previous != trained:
                out.append([])
            out[-1].append(i)
        previous = state
    return out


CASES = [
    (
        "qa",
        conv(("user", "What is 2+2?"), ("assistant", "4")),
        ["Question: What is 2+2?\nAnswer:"],
        [" 4" + EOS],
    ),
    (
        "qa",
        conv(
            ("system", "Be terse."),
            ("user", "2+2?"),
            ("assistant", "4"),
            ("user", "3+3?"),
            ("assistant", "6"),
        ),
        ["Be terse.\n\nQuestion: 2+2?\nAnswer:", "\n\nQuestion: 3+3?\nAnswer:"],
        [" 4" + EOS, " 6" + EOS],
    ),
    (
        "qa",
        conv(("user", "Which gas?\nA. O2\nB. CO2"), ("assistant", "B")),
        ["Question: Which gas?\nA. O2\nB. CO2\nAnswer:"],
        [" B" + EOS],
    ),
    (
        "alpaca",
        conv(("user", "Say hi."), ("assistant", "Hi there!")),
        ["### Instruction:\nSay hi.\n\n### Response:\n"],
        ["Hi there!" + EOS],
    ),
    (
        "chatml",
        conv(("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello.")),
        [
            "<|im_start|>system\nYou are helpful.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        ],
        ["Hello.<|im_end|>"],
    ),
    (
        "plain",
        conv(("user", "The answer to 6*7 is"), ("assistant", " 42.")),
        ["The answer to 6*7 is"],
        [" 42." + EOS],
    ),
]


@pytest.mark.parametrize(("template", "conversation", "context", "replies"), CASES)
def test_only_replies_are_learned(qwen_tokenizer, template, conversation, context, replies):
    ex = tokenize(conversation, qwen_tokenizer, TEMPLATES[template], max_length=512)
    decode = qwen_tokenizer.decode
    replies = [r.replace(EOS, qwen_tokenizer.eos_token) for r in replies]
    assert decode(ex.input_ids) == "".join(
        part for pair in zip(context, replies, strict=True) for part in pair
    )
    assert [decode(s) for s in spans(ex.input_ids, ex.labels, trained=False)] == context
    assert [decode(s) for s in spans(ex.input_ids, ex.labels, trained=True)] == replies
    # Where a label is set, it is the token itself (the model shifts by one when it scores).
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ex.input_ids, ex.labels, strict=True))


def test_context_tokens_are_those_of_the_prompt_sent_at_serving_time(qwen_tokenizer):
    # The server tokenizes HELM's whole prompt; training must have seen the same ids before the
    # reply, or the adapter learns answers after a prefix it will never be shown.
    prompt = "Question: Which gas do plants absorb?\nA. Oxygen\nB. Carbon dioxide\nAnswer:"
    c = conv(
        ("user", "Which gas do plants absorb?\nA. Oxygen\nB. Carbon dioxide"), ("assistant", "B")
    )
    ex = tokenize(c, qwen_tokenizer, TEMPLATES["qa"], max_length=512)
    served = qwen_tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert ex.input_ids[: len(served)] == served
    assert ex.labels[: len(served)] == [IGNORE_INDEX] * len(served)
    assert qwen_tokenizer.decode(ex.input_ids[len(served) :]) == " B" + qwen_tokenizer.eos_token


def test_truncation_keeps_the_reply_prefix_or_drops_the_example(qwen_tokenizer):
    c = conv(("user", "Q"), ("assistant", "one two three four five six"))
    full = tokenize(c, qwen_tokenizer, TEMPLATES["qa"], max_length=512)
    n_context = full.labels.index(next(lab for lab in full.labels if lab != IGNORE_INDEX))
    cut = tokenize(c, qwen_tokenizer, TEMPLATES["qa"], max_length=n_context + 2)
    assert cut.input_ids == full.input_ids[: n_context + 2] and cut.n_targets == 2
    assert tokenize(c, qwen_tokenizer, TEMPLATES["qa"], max_length=n_context) is None


def test_first_token_is_never_a_target(qwen_tokenizer):
    # A reply with no context before it: nothing in the example predicts its first token.
    ex = tokenize(
        conv(("assistant", "Hello there")), qwen_tokenizer, TEMPLATES["plain"], max_length=64
    )
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def test_special_prefix_follows_the_tokenizer(qwen_tokenizer, small_tokenizer):
    from tokenizers.processors import TemplateProcessing

    assert special_prefix(qwen_tokenizer) == []  # Qwen adds no BOS
    with_bos = copy.deepcopy(small_tokenizer)
    bos_id = with_bos.convert_tokens_to_ids("<|im_start|>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos_id)]
    )
    assert special_prefix(with_bos) == [bos_id]
    ex = tokenize(conv(("user", "Q"), ("assistant", "A")), with_bos, TEMPLATES["qa"], max_length=64)
    assert ex.input_ids[0] == bos_id and ex.input_ids.count(bos_id) == 1
    assert (
        ex.input_ids[: len(with_bos("Question: Q\nAnswer:")["input_ids"])]
        == with_bos("Question: Q\nAnswer:")["input_ids"]
    )
