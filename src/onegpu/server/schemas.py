"""The challenge's wire types (its /process, /tokenize and /decode contract) and their conversion.

Field names and defaults follow the challenge's starter kit; HELM's extra fields are accepted.
Conversion to and from the engine's dataclasses happens here and nowhere else.
"""

from __future__ import annotations

import logging
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from onegpu.engine.types import Completion, GenerationRequest
from onegpu.server.limits import (
    MAX_DECODE_TOKENS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENIZE_CHARS,
    MAX_TOP_K_PER_TOKEN,
)

log = logging.getLogger(__name__)

_FINITE = ConfigDict(allow_inf_nan=False, extra="allow")


class _Request(BaseModel):
    model_config = _FINITE

    @model_validator(mode="after")
    def _note_ignored(self):
        if self.model_extra:
            log.debug("ignoring fields %s", sorted(self.model_extra))
        return self


class ProcessRequest(_Request):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    num_samples: int = Field(1, ge=1, le=1, description="only 1 is supported")
    num_return_sequences: int | None = Field(None, ge=1, le=1, description="HELM's name; 1 only")
    max_new_tokens: int = Field(50, ge=0, le=MAX_NEW_TOKENS)
    top_k: int = Field(200, ge=0, description="sampling cut-off; 0 disables")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.0, description="<= 1e-5 (HELM's 1e-7) means greedy")
    # What torch.Generator.manual_seed takes: a signed or unsigned 64-bit integer.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    echo_prompt: bool = False
    top_k_per_token: int = Field(
        1,
        ge=1,
        le=MAX_TOP_K_PER_TOKEN,
        description="alternatives reported per token (not a sampling cut-off)",
    )
    stop_sequences: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )

    def to_engine(self, request_id: str | None = None) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            echo_prompt=self.echo_prompt,
            top_k_per_token=self.top_k_per_token,
            stop_sequences=tuple(s for s in self.stop_sequences if s),
            request_id=request_id,
        )


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float

    @classmethod
    def from_engine(cls, completion: Completion, request_time: float) -> ProcessResponse:
        return cls(
            text=completion.text,
            tokens=[
                Token(text=t.text, logprob=t.logprob, top_logprob=t.top_logprob)
                for t in completion.tokens
            ],
            logprob=completion.logprob,
            request_time=request_time,
        )


class TokenizeRequest(_Request):
    text: str = Field(max_length=MAX_TOKENIZE_CHARS)
    truncation: bool = True
    max_length: int = Field(2048, ge=1)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(_Request):
    tokens: list[int] = Field(max_length=MAX_DECODE_TOKENS)


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class Health(BaseModel):
    status: str
    version: str  # onegpu's
    model: str | None = None
    device: str | None = None
    quantization: str | None = None
    adapter: str | None = None
    max_context: int | None = None
    queued: int = 0
