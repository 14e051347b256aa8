"""Typed settings for each job, read from arguments and `ONEGPU_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """`onegpu serve`: what model to load and how to serve it (env: ONEGPU_MODEL, ...)."""

    model_config = SettingsConfigDict(env_prefix="ONEGPU_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    model: str | None = Field(
        None, description="local folder or hub id; empty serves the embedded SmolLM2-135M"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    adapter: str | None = Field(None, description="peft adapter folder served on top of the model")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: str = Field("auto", description="auto, float16, bfloat16 or float32")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="cap on GPU memory, e.g. 24 to behave like an RTX 4090"
    )
    max_context: int = Field(2048, ge=16, description="context window: prompt + new tokens")
    default_stop: list[str] = Field(
        default_factory=lambda: ["\n\n"],
        description="cut applied when a request asks for >1 token and gives no stop_sequences",
    )
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    max_batch: int = Field(
        32, ge=1, description="most requests decoded together (fewer if GPU memory is short)"
    )
    cuda_graphs: bool = Field(True, description="replay the decode step from CUDA graphs")
    max_queue: int = Field(256, ge=1, description="requests allowed to wait; more get 503")
    request_timeout_s: float = Field(
        1800, gt=0, description="a request still unanswered after this gets 503 and is dropped"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger bodies get 413")
    shutdown_grace_s: float = Field(
        60, ge=0, description="on SIGTERM, how long in-flight requests get to finish"
    )
    log_level: str = "INFO"
