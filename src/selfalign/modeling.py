"""Loading models and tokenizers: one place, used by generation, training and chat.

A model is a local directory or a hub id (never fetched when `HF_HUB_OFFLINE=1`). A directory
holding a PEFT adapter (`adapter_config.json`) loads its base model with the adapter applied.
Weights load from safetensors only, and `trust_remote_code` is off unless the user asks for it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

from selfalign.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str, key: str = "--device") -> str:
    """`device` with auto resolved; a UserError naming `key` (the flag or config key that set
    it) when it asks for CUDA on a machine without."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key} {device}: CUDA is not available on this machine (use cpu or auto)")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def _check_exists(name: str) -> None:
    """Fail early, in one line, for a model that cannot be found."""
    if Path(name).expanduser().exists():
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise UserError(f"model {name!r}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"model {name!r}: no such directory, and HF_HUB_OFFLINE=1 so the hub is not tried"
        )


def adapter_base(path: str | Path) -> str | None:
    """The base model named by a PEFT adapter directory, or None if `path` is no adapter."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        why = f"not valid JSON: {e}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UserError(
            f"{config}: damaged ({why}); this adapter directory cannot be loaded: re-export "
            "the adapter (or train it again)"
        ) from None
    base = data.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise UserError(f"{config}: no base_model_name_or_path; cannot tell which model to load")
    return base


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_exists(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model {name!r}: cannot load its tokenizer ({str(e).splitlines()[0]})"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a causal LM (or base + adapter) for inference; returns (model, tokenizer, device)."""
    from transformers import AutoModelForCausalLM

    _check_exists(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    base = adapter_base(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base or name,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
        if base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, name)
    except (OSError, ValueError) as e:
        raise UserError(f"model {name!r}: cannot load it ({str(e).splitlines()[0]})") from None
    has_tokenizer = (Path(name) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(name if has_tokenizer or not base else base, trust_remote_code)
    model.to(device)
    model.eval()
    return model, tokenizer, device


def configured_context(name: str) -> int | None:
    """The context length a local model directory's config.json declares (None when there is no
    such file or it names none); reads no weights."""
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return _context_of(data.get) if isinstance(data, dict) else None


def context_length(model) -> int:
    return _context_of(lambda key: getattr(model.config, key, None)) or 2048


def _context_of(get) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def with_cache(model, cache) -> dict[str, Any]:
    """The forward keyword that passes a KV cache to `model`: `cache` since transformers 5.2x,
    `past_key_values` before (vLLM's CPU build pins transformers <5.20, so both are supported)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return {_cache_keyword(type(base)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def eos_ids(generation_config, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS and every EOS of the generation config (chat models often end a turn
    with a token of their own)."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


def model_eos_ids(name: str, tokenizer) -> frozenset[int]:
    """`eos_ids` of a model directory, without loading its weights."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(name)
    except OSError:  # no generation_config.json
        config = None
    return eos_ids(config, tokenizer)
