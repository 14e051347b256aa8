"""OpenAI's wire format over the same engine: /v1/completions, /v1/chat/completions, /v1/models,
checked with plain HTTP and with the `openai` client itself."""

from __future__ import annotations

import pytest

from tests.live import live_server

GREEDY = {"temperature": 0}


def test_a_completion_is_the_engines_answer(tiny_client):
    ours = tiny_client.post(
        "/process", json={"prompt": "Hello world", "max_new_tokens": 4, "temperature": 0}
    ).json()
    theirs = tiny_client.post(
        "/v1/completions", json={"prompt": "Hello world", "max_tokens": 4, **GREEDY}
    ).json()
    (choice,) = theirs["choices"]
    assert choice["text"] == ours["text"] and choice["logprobs"] is None
    assert theirs["object"] == "text_completion" and theirs["model"] == "tiny-qwen2"
    assert theirs["usage"]["completion_tokens"] == 4 and choice["finish_reason"] == "length"


def test_echo_with_logprobs_scores_the_prompt_as_process_does(tiny_client):
    process = tiny_client.post(
        "/process",
        json={"prompt": "The cat sat on", "max_new_tokens": 1, "temperature": 0,
              "echo_prompt": True, "top_k_per_token": 2},
    ).json()  # fmt: skip
    body = {"prompt": "The cat sat on", "max_tokens": 1, "echo": True, "logprobs": 2, **GREEDY}
    choice = tiny_client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == process["text"]
    assert logprobs["tokens"] == [t["text"] for t in process["tokens"]]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == [t["logprob"] for t in process["tokens"][1:]]
    assert logprobs["top_logprobs"][1:] == [t["top_logprob"] for t in process["tokens"][1:]]
    texts = logprobs["tokens"]
    assert logprobs["text_offset"] == [len("".join(texts[:i])) for i in range(len(texts))]


def test_prompts_as_token_ids_and_in_batches(tiny_client):
    ids = tiny_client.post("/tokenize", json={"text": "Hello world"}).json()["tokens"]
    as_text = tiny_client.post(
        "/v1/completions", json={"prompt": "Hello world", "max_tokens": 3, **GREEDY}
    ).json()["choices"][0]["text"]
    batch = tiny_client.post(
        "/v1/completions", json={"prompt": [ids, ids[:1]], "max_tokens": 3, **GREEDY}
    ).json()["choices"]
    assert [c["index"] for c in batch] == [0, 1] and batch[0]["text"] == as_text
    texts = tiny_client.post(
        "/v1/completions", json={"prompt": ["Hello world", "Hi"], "max_tokens": 3, **GREEDY}
    ).json()["choices"]
    assert texts[0]["text"] == as_text and len(texts) == 2


def test_no_default_stop_but_the_callers_own(tiny_client):
    long = tiny_client.post(
        "/v1/completions", json={"prompt": "Once", "max_tokens": 12, **GREEDY}
    ).json()["choices"][0]
    assert long["finish_reason"] == "length"  # /process would cut at a blank line by default
    first = long["text"][1:3]
    cut = tiny_client.post(
        "/v1/completions", json={"prompt": "Once", "max_tokens": 12, "stop": first, **GREEDY}
    ).json()["choices"][0]
    assert first not in cut["text"] and cut["finish_reason"] == "stop"


def test_chat_uses_the_tokenizers_template(tiny_client, qwen_tokenizer):
    messages = [{"role": "user", "content": "Say hi"}]
    body = {"messages": messages, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, **GREEDY}
    answer = tiny_client.post("/v1/chat/completions", json=body).json()
    (choice,) = answer["choices"]
    prompt = qwen_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    plain = tiny_client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, **GREEDY})
    assert choice["message"] == {"role": "assistant", "content": plain.json()["choices"][0]["text"]}
    content = choice["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())


def test_models_lists_the_served_model(tiny_client):
    assert tiny_client.get("/v1/models").json()["data"][0]["id"] == "tiny-qwen2"


@pytest.mark.parametrize(
    ("body", "says", "param"),
    [
        ({"prompt": "x", "n": 2}, "only n=1", None),
        ({"prompt": "x", "stream": True}, "streaming is not supported", None),
        ({"prompt": "x", "temperature": "hot"}, "valid number", "temperature"),
        ({"prompt": "x", "max_tokens": -1}, "greater than or equal to 0", "max_tokens"),
        ({"prompt": "x", "logprobs": 99}, "less than or equal to 20", "logprobs"),
        ({"prompt": [[1, 2], [10**9]], "max_tokens": 1}, "token ids must be in", None),
        ({"prompt": []}, "at least one prompt", None),
        ({"prompt": "x", "stop": ["s"] * 17}, "at most 16", None),
        ({"max_tokens": 1}, "Field required", "prompt"),
        ({"prompt": "x" * 3000, "max_tokens": 1}, "context window", None),
    ],
)
def test_bad_input_is_a_400_in_openais_shape(tiny_client, body, says, param):
    answer = tiny_client.post("/v1/completions", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_chat_bad_input_is_a_400_too(tiny_client):
    answer = tiny_client.post("/v1/chat/completions", json={"messages": []})
    assert answer.status_code == 400 and "messages" in answer.json()["error"]["message"]
    role = tiny_client.post(
        "/v1/chat/completions", json={"messages": [{"role": "x", "content": ""}]}
    )
    assert role.status_code == 400 and role.json()["error"]["param"] == "messages.0.role"


@pytest.mark.slow
def test_the_openai_client_talks_to_the_server(tiny_qwen_model, qwen_tokenizer):
    openai = pytest.importorskip("openai", reason="needs openai (make test installs it)")
    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings
    from tests.conftest import make_engine

    engine = make_engine(tiny_qwen_model, qwen_tokenizer, max_context=256)
    with live_server(create_app(ServeSettings(), engine=engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list().data
        done = client.completions.create(
            model=model.id, prompt="Hello", max_tokens=3, temperature=0, logprobs=2, echo=True
        )
        choice = done.choices[0]
        assert choice.text.startswith("Hello") and len(choice.logprobs.tokens) == 4
        assert choice.logprobs.token_logprobs[0] is None and done.usage.completion_tokens == 3
        chat = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            temperature=0, logprobs=True, top_logprobs=3,
        )  # fmt: skip
        assert chat.choices[0].message.role == "assistant"
        assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
        with pytest.raises(openai.BadRequestError, match="only n=1"):
            client.completions.create(model=model.id, prompt="x", n=2)


def test_an_end_of_text_is_a_token_of_its_own(qwen_tokenizer):
    """lm-evaluation-harness reads one token past an echoed prompt: one that ends the text too."""
    from fastapi.testclient import TestClient

    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings
    from tests.conftest import make_engine
    from tests.engine.conftest import ScriptedLM

    model = ScriptedLM([], len(qwen_tokenizer), eos_id=151643)  # ends the text at once
    engine = make_engine(model, qwen_tokenizer)
    with TestClient(create_app(ServeSettings(), engine=engine)) as client:
        body = {"prompt": "one two three", "max_tokens": 1, "echo": True, "logprobs": 1, **GREEDY}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        process = client.post("/process", json={"prompt": "one", "temperature": 0}).json()
    prompt = len(qwen_tokenizer.encode("one two three"))
    assert len(choice["logprobs"]["token_logprobs"]) == prompt + 1
    assert choice["logprobs"]["tokens"][-1] == "" and choice["text"] == "one two three"
    assert choice["finish_reason"] == "stop"
    assert process["text"] != ""  # /process never ends on the first token (min_new_tokens)
