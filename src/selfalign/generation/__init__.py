"""Generation backends behind one contract (see `base.py`); a plain dict picks one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selfalign.generation.base import Backend, Completion, SamplingParams, row_seed

__all__ = ["Backend", "BackendConfig", "Completion", "SamplingParams", "load_backend", "row_seed"]


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


def _transformers(cfg: BackendConfig) -> Backend:
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.load(
        cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.trust_remote_code, cfg.share_prefix
    )


def _openai(cfg: BackendConfig) -> Backend:
    from selfalign.errors import UserError
    from selfalign.generation.openai_backend import OpenAIBackend

    if not cfg.base_url:
        raise UserError("backend 'openai' needs model.base_url, e.g. http://localhost:8000/v1")
    return OpenAIBackend(
        cfg.model, cfg.base_url, cfg.api_key_env, cfg.concurrency, context=cfg.context
    )


LOADERS = {"transformers": _transformers, "openai": _openai}


def load_backend(cfg: BackendConfig) -> Backend:
    return LOADERS[cfg.backend](cfg)
