"""Shared fixtures: everything offline, tiny models built on the spot."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SELFALIGN_PROGRESS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama model + trained BPE tokenizer saved under a temp dir (built once)."""
    from selfalign.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.load(
        str(tiny_model_dir), device="cpu", dtype="float32", batch_size=8
    )


@pytest.fixture(scope="session")
def pipeline_model_dir(tmp_path_factory):
    """The tiny model with a context that holds the default constitution's stage-2 prompt (about
    4,500 tokens with the tiny tokenizer), as `selfalign run`'s preflight requires."""
    from selfalign.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-long") / "model", context=8192)
