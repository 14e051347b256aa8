"""Domain types shared by the engine and its callers.

Plain dataclasses and exceptions only: the server imports this module, so it must never import
torch, FastAPI or pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# HELM sends temperature 0 as 1e-7; anything this small means "take the argmax".
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One completion request, in the engine's terms (already validated at the edge)."""

    prompt: str
    max_new_tokens: int = 50
    temperature: float = 0.8
    top_k: int = 200
    top_p: float = 1.0
    seed: int | None = None
    echo_prompt: bool = False
    top_k_per_token: int = 1
    stop_sequences: tuple[str, ...] = ()
    min_new_tokens: int = 1
    # With no stop_sequences, end at the server's default cut (--default-stop; the challenge's
    # /process); OpenAI's routes generate to max_new_tokens or the end of text instead.
    default_stop: bool = True
    request_id: str | None = None  # named in the request's log line
    # Token ids given instead of text (OpenAI's prompt may be ids): fed as they are.
    prompt_ids: tuple[int, ...] | None = None
    # An end-of-text is returned as a token of its own (no text), with its logprob, as OpenAI's
    # servers do: lm-evaluation-harness counts on one token after an echoed prompt.
    keep_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One returned token: its text, its log-probability and its most likely alternatives."""

    text: str
    logprob: float
    top_logprob: dict[str, float]


@dataclass(frozen=True, slots=True)
class Completion:
    """What the engine returns for one request.

    `text` is exactly the concatenation of `tokens[i].text`; `logprob` is the sum of theirs.
    """

    text: str
    tokens: list[TokenInfo]
    logprob: float
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "length" | "stop" | "eos" | "prompt_only"
    seconds: float = 0.0
    first_token_seconds: float | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a running engine says about itself (for readiness and logs)."""

    name: str
    device: str
    dtype: str
    max_context: int
    vocab_size: int
    quantization: str | None = None
    adapter: str | None = None


class EngineError(Exception):
    """Base class for problems the engine reports to its caller."""


class InvalidRequestError(EngineError):
    """The request cannot be served as asked (maps to HTTP 400)."""


class ContextWindowError(InvalidRequestError):
    """Prompt plus requested tokens exceed the model's context window (maps to HTTP 400)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_context = max_context
        super().__init__(
            f"prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"together {prompt_tokens + max_new_tokens} exceed the context window of "
            f"{max_context} tokens; shorten the prompt or ask for fewer tokens"
        )


class EngineUnavailableError(EngineError):
    """The engine cannot take work right now (not loaded, shutting down, failed; maps to 503)."""


class EngineInternalError(EngineError):
    """A bug met while serving one request; the engine goes on with the next (maps to 500)."""

    @classmethod
    def of(cls, exc: BaseException) -> EngineInternalError:
        """Wrap a bug for the caller: its type only, never its message (no internals leak)."""
        return cls(f"internal engine error ({type(exc).__name__})")


class EngineFatalError(EngineUnavailableError):
    """The device or model is broken (e.g. a CUDA fault); the server must be restarted (503)."""


class EngineOverloadedError(EngineUnavailableError):
    """The engine ran out of a resource (GPU memory, queue slots) for this request (maps to 503)."""


class RequestCancelledError(EngineError):
    """The caller gave up on the request (client gone, or its deadline passed)."""
