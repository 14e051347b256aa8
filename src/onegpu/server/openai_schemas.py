"""OpenAI's wire types (completions, chat completions, models) and their conversion to and from
the engine's, for the clients people already use: the `openai` package, lm-evaluation-harness.

Unlike the challenge's /process, these follow OpenAI's semantics: no default stop, end-of-text
allowed as the first token, `temperature` 1 by default, `logprobs` per token with the prompt's
first token unscored (null) when echoed, `n` of 1 only, no streaming. Unknown fields are accepted
and ignored, as OpenAI's own server does for fields it does not know.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from onegpu.engine.types import Completion, GenerationRequest, InvalidRequestError
from onegpu.server.limits import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOP_K_PER_TOKEN,
)
from onegpu.server.schemas import _Request

# Prompts one completion request may carry (OpenAI's batch of prompts), and their token ids.
MAX_PROMPTS = 64
MAX_PROMPT_IDS = 32_768
MAX_MESSAGES = 256

Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class _Sampling(_Request):
    """What both kinds of request share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="only 1 is supported")
    stop: Stop | list[Stop] | None = Field(None, description="up to 16 strings")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = Field(False, description="not supported")

    def check(self) -> None:
        """Refuse, in OpenAI's words, what this server does not do."""
        if self.n != 1:
            raise InvalidRequestError("n: only n=1 is supported (one choice per prompt)")
        if self.stream:
            raise InvalidRequestError("stream: streaming is not supported; send stream=false")
        stops = self.stops()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(f"stop: at most {MAX_STOP_SEQUENCES} sequences")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def engine_request(self, prompt: str | list[int], max_new_tokens: int, *, echo: bool,
                       alternatives: int, request_id: str | None) -> GenerationRequest:  # fmt: skip
        ids = tuple(prompt) if isinstance(prompt, list) else None
        return GenerationRequest(
            prompt=prompt if isinstance(prompt, str) else "",
            prompt_ids=ids,
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=0,  # OpenAI has no top-k cut
            top_p=self.top_p,
            seed=self.seed,
            echo_prompt=echo,
            top_k_per_token=max(alternatives, 1),
            stop_sequences=self.stops(),
            min_new_tokens=0,  # end-of-text may come first
            default_stop=False,
            keep_eos=True,
            request_id=request_id,
        )


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | Ids | list[Ids] = Field(
        description="a string, a list of strings, token ids, or a list of token id lists"
    )
    max_tokens: int | None = Field(16, ge=0, le=MAX_NEW_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_K_PER_TOKEN)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # one prompt of token ids
        if not prompt:
            raise InvalidRequestError("prompt: give at least one prompt")
        if len(prompt) > MAX_PROMPTS:
            raise InvalidRequestError(f"prompt: at most {MAX_PROMPTS} prompts in one request")
        return list(prompt)

    def to_engine(self, request_id: str | None) -> list[GenerationRequest]:
        return [
            self.engine_request(
                prompt,
                16 if self.max_tokens is None else self.max_tokens,
                echo=self.echo,
                alternatives=self.logprobs or 0,
                request_id=request_id,
            )
            for prompt in self.prompts()
        ]


class Message(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_K_PER_TOKEN)

    def limit(self) -> int | None:
        """The tokens asked for (None: as many as the context window leaves)."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def to_engine(self, prompt: str, max_new_tokens: int, request_id: str | None):
        alternatives = (self.top_logprobs or 0) if self.logprobs else 0
        return self.engine_request(
            prompt, max_new_tokens, echo=False, alternatives=alternatives, request_id=request_id
        )


# -- answers --------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completions: list[Completion]) -> Usage:
        prompt = sum(c.prompt_tokens for c in completions)
        new = sum(c.new_tokens for c in completions)
        return cls(prompt_tokens=prompt, completion_tokens=new, total_tokens=prompt + new)


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage

    @classmethod
    def from_engine(
        cls, request: CompletionRequest, completions: list[Completion], model: str
    ) -> CompletionResponse:
        choices = []
        for index, completion in enumerate(completions):
            logprobs = None
            if request.logprobs is not None:
                logprobs = _logprobs(completion, request.logprobs, echoed=request.echo)
            choices.append(
                Choice(
                    index=index,
                    text=completion.text,
                    logprobs=logprobs,
                    finish_reason=_finish(completion),
                )
            )
        return cls(id=_id("cmpl"), created=int(time.time()), model=model, choices=choices,
                   usage=Usage.of(completions))  # fmt: skip


class Alternative(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Alternative):
    top_logprobs: list[Alternative]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def from_engine(cls, request: ChatRequest, completion: Completion, model: str) -> ChatResponse:
        logprobs = None
        if request.logprobs:
            k = request.top_logprobs or 0
            logprobs = ChatLogprobs(
                content=[
                    TokenLogprob(
                        token=t.text,
                        logprob=t.logprob,
                        bytes=list(t.text.encode()),
                        top_logprobs=[
                            Alternative(token=text, logprob=value, bytes=list(text.encode()))
                            for text, value in list(t.top_logprob.items())[:k]
                        ],
                    )  # fmt: skip
                    for t in completion.tokens
                ]
            )
        choice = ChatChoice(
            index=0,
            message=ChatMessage(content=completion.text),
            logprobs=logprobs,
            finish_reason=_finish(completion),
        )
        return cls(id=_id("chatcmpl"), created=int(time.time()), model=model, choices=[choice],
                   usage=Usage.of([completion]))  # fmt: skip


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "onegpu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def _logprobs(completion: Completion, k: int, *, echoed: bool) -> Logprobs:
    """OpenAI's per-token logprobs; an echoed prompt's first token has none (null)."""
    tokens = completion.tokens
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token.text)
    values: list[float | None] = [t.logprob for t in tokens]
    tops: list[dict[str, float] | None] = [dict(list(t.top_logprob.items())[:k]) for t in tokens]
    if echoed and tokens:
        values[0], tops[0] = None, None
    return Logprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=values,
        top_logprobs=tops,
        text_offset=offsets,
    )


def _finish(completion: Completion) -> Literal["stop", "length"]:
    return "stop" if completion.finish_reason in ("stop", "eos") else "length"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
