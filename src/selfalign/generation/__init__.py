"""Generation backends behind one contract (see `base.py`); a plain dict picks one.

`capabilities(cfg)` says what the configured backend can honour without loading its model (for
a preflight); `load_backend(cfg)` loads it.
"""

from __future__ import annotations

from typing import Any, Literal

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
    backend: Literal["transformers", "vllm", "openai"] = Field(
        "transformers",
        description="transformers: in-process; vllm: in-process vLLM engine (pip install "
        "'selfalign[vllm]'); openai: an OpenAI-compatible server (vllm serve, SGLang, TGI, "
        "llama.cpp).",
    )
    device: str = Field(
        "auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16/fp16 on CUDA, float32 on CPU."
    )
    batch_size: int = Field(8, ge=1, description="transformers backend: prompts decoded together.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint."
    )
    share_prefix: bool = Field(True, description="Prefill the job's common prompt prefix once.")
    context: int | None = Field(
        None,
        description="Max model length: vllm and serve=auto pass it to vLLM (unset: the model's "
        "own); openai: the server's, for left truncation.",
    )
    # -- vLLM (backend vllm, and the server serve=auto starts) ------------------------------------
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one model is split over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vLLM: fraction of each GPU's memory it may take."
    )
    # -- openai: an OpenAI-compatible server -------------------------------------------------------
    base_url: str | None = Field(
        None, description="openai backend: server URL, e.g. http://localhost:8000/v1."
    )
    server: Literal["vllm", "llama.cpp", "generic"] = Field(
        "generic",
        description="openai backend: the server's kind; selfalign sends neutral values for the "
        "sampling fields it would otherwise default (vllm: also the n-gram penalties, through "
        "selfalign's logits processor).",
    )
    serve: Literal["no", "auto"] = Field(
        "no",
        description="openai backend: auto starts a vLLM server on a free 127.0.0.1 port for the "
        "model each stage generates with (the engraved one in stage 4) and stops it after.",
    )
    served_name: str | None = Field(
        None,
        description="openai backend: the model's name on the server (unset: model.model), "
        "checked against GET /models.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai backend: environment variable holding the API key."
    )
    concurrency: int = Field(16, ge=1, description="openai backend: requests in flight at once.")
    timeout: float = Field(600.0, gt=0, description="openai backend: seconds per request.")
    retries: int = Field(
        3,
        ge=0,
        description="openai backend: retries of a request after HTTP 429/5xx or a lost "
        "connection (exponential backoff).",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="openai backend: fields added to every request (they override selfalign's).",
    )
    tokenizer: str | None = Field(
        None,
        description="openai backend: the served model's tokenizer, a local directory or hub id "
        "(unset: model, when it is a local directory or in the hub cache). Needed for EOS "
        "suppression (stage 1), the apology bias (stage 2) and chat templates (stage 4).",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> BackendConfig:
        if self.tokenizer is not None and self.backend != "openai":
            raise ValueError(
                "tokenizer is for the openai backend; the other backends use the model's own "
                "tokenizer (remove model.tokenizer)"
            )
        if self.backend == "openai" and self.serve == "auto":
            if self.base_url is not None:
                raise ValueError("serve=auto starts its own server: remove base_url")
            if self.server not in ("vllm", "generic"):
                raise ValueError("serve=auto starts a vLLM server: remove server or set it to vllm")
            self.server = "vllm"
        return self


def _transformers(cfg: BackendConfig) -> Backend:
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.load(
        cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.trust_remote_code, cfg.share_prefix
    )


def _vllm(cfg: BackendConfig) -> Backend:
    from selfalign.generation.vllm_backend import VllmBackend

    return VllmBackend.load(cfg)


def _openai(cfg: BackendConfig) -> Backend:
    from selfalign.errors import UserError
    from selfalign.generation.openai_backend import OpenAIBackend

    if cfg.serve == "auto":
        from selfalign.generation.server import start_vllm_server

        server = start_vllm_server(cfg)
        try:
            return OpenAIBackend.from_config(
                cfg, base_url=server.url, served_name=server.name, on_close=server.stop
            )
        except BaseException:
            server.stop()
            raise
    if not cfg.base_url:
        raise UserError(
            "backend 'openai' needs model.base_url, e.g. http://localhost:8000/v1 (or "
            "model.serve: auto to have selfalign start a vLLM server)"
        )
    return OpenAIBackend.from_config(cfg)


def _transformers_capabilities(cfg: BackendConfig) -> Capabilities:
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.CAPABILITIES


def _vllm_capabilities(cfg: BackendConfig) -> Capabilities:
    from selfalign.generation.vllm_backend import VllmBackend

    return VllmBackend.CAPABILITIES


def _openai_capabilities(cfg: BackendConfig) -> Capabilities:
    from selfalign.generation.openai_backend import OpenAIBackend

    return OpenAIBackend.capabilities_for(cfg)


LOADERS = {"transformers": _transformers, "vllm": _vllm, "openai": _openai}
CAPABILITIES = {
    "transformers": _transformers_capabilities,
    "vllm": _vllm_capabilities,
    "openai": _openai_capabilities,
}


def load_backend(cfg: BackendConfig) -> Backend:
    return LOADERS[cfg.backend](cfg)


def capabilities(cfg: BackendConfig) -> Capabilities:
    """What the backend of `cfg` can honour, known without loading its model (`require` takes
    it in a preflight). Its `tokenizer` says whether one will be there once loaded."""
    return CAPABILITIES[cfg.backend](cfg)
