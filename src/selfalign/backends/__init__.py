"""Generation backends behind one contract (see `base.py`); a plain dict picks one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selfalign.backends.base import Backend, Completion, SamplingParams, row_seed

__all__ = ["Backend", "BackendConfig", "Completion", "SamplingParams", "load_backend", "row_seed"]


class BackendConfig(BaseModel):
    """Which model generates, and how it is run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ..., description="Local model directory or hub id (a PEFT adapter dir works too)."
    )
    backend: Literal["transformers"] = Field("transformers", description="Generation engine.")
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


def _transformers(cfg: BackendConfig) -> Backend:
    from selfalign.backends.transformers_backend import TransformersBackend

    return TransformersBackend.load(
        cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.trust_remote_code, cfg.share_prefix
    )


LOADERS = {"transformers": _transformers}


def load_backend(cfg: BackendConfig) -> Backend:
    return LOADERS[cfg.backend](cfg)
