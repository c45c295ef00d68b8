"""Generation backends behind one contract (see `base.py`); a plain dict picks one.

`capabilities(cfg)` says what the configured backend can honour without loading its model (for
a preflight); `load_backend(cfg)` loads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfalign.generation.base import (
    Backend,
    Capabilities,
    Completion,
    Need,
    SamplingParams,
    require,
    row_seed,
)

__all__ = [
    "Backend",
    "BackendConfig",
    "Capabilities",
    "Completion",
    "Need",
    "SamplingParams",
    "capabilities",
    "load_backend",
    "require",
    "row_seed",
]


class BackendConfig(BaseModel):
    """Which model generates, and how it is run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ..., description="Local model directory or hub id (a PEFT adapter dir works too)."
    )
    backend: Literal["transformers", "openai"] = Field(
        "transformers",
        description="transformers: in-process; openai: an OpenAI-compatible server (vllm serve, SGLang, TGI, llama.cpp).",
    )
    device: str = Field(
        "auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16/fp16 on CUDA, float32 on CPU."
    )
    batch_size: int = Field(8, ge=1, description="Prompts decoded together.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint."
    )
    share_prefix: bool = Field(True, description="Prefill the job's common prompt prefix once.")
    base_url: str | None = Field(
        None, description="openai backend: server URL, e.g. http://localhost:8000/v1."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai backend: environment variable holding the API key."
    )
    concurrency: int = Field(16, ge=1, description="openai backend: requests in flight at once.")
    context: int | None = Field(
        None, description="openai backend: the server's max model length (for truncation)."
    )
    tokenizer: str | None = Field(
        None,
        description="openai backend: the served model's tokenizer, a local directory or hub id "
        "(unset: model, when it is a local directory or in the hub cache). Needed for EOS "
        "suppression (stage 1), the apology bias (stage 2) and chat templates (stage 4).",
    )

    @model_validator(mode="after")
    def _tokenizer_for_http_only(self) -> BackendConfig:
        if self.tokenizer is not None and self.backend != "openai":
            raise ValueError(
                "tokenizer is for the openai backend; the transformers backend uses the "
                "model's own tokenizer (remove model.tokenizer)"
            )
        return self


def _transformers(cfg: BackendConfig) -> Backend:
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.load(
        cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.trust_remote_code, cfg.share_prefix
    )


def _openai(cfg: BackendConfig) -> Backend:
    from selfalign.errors import UserError
    from selfalign.generation.openai_backend import OpenAIBackend, load_http_tokenizer

    if not cfg.base_url:
        raise UserError("backend 'openai' needs model.base_url, e.g. http://localhost:8000/v1")
    tokenizer = load_http_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code)
    return OpenAIBackend(
        cfg.model, cfg.base_url, cfg.api_key_env, cfg.concurrency, context=cfg.context,
        tokenizer=tokenizer,
    )  # fmt: skip


def _transformers_capabilities(cfg: BackendConfig) -> Capabilities:
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.CAPABILITIES


def _openai_capabilities(cfg: BackendConfig) -> Capabilities:
    from selfalign.generation.openai_backend import OpenAIBackend, has_http_tokenizer

    return OpenAIBackend.CAPABILITIES.with_tokenizer(has_http_tokenizer(cfg.model, cfg.tokenizer))


LOADERS = {"transformers": _transformers, "openai": _openai}
CAPABILITIES = {"transformers": _transformers_capabilities, "openai": _openai_capabilities}


def load_backend(cfg: BackendConfig) -> Backend:
    return LOADERS[cfg.backend](cfg)


def capabilities(cfg: BackendConfig) -> Capabilities:
    """What the backend of `cfg` can honour, known without loading its model (`require` takes
    it in a preflight). Its `tokenizer` says whether one will be there once loaded."""
    return CAPABILITIES[cfg.backend](cfg)
