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


# a chat template for the tiny model (its trained tokenizer has none)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with CHAT_TEMPLATE in its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pipeline_model_dir(tmp_path_factory):
    """The tiny model with a context that holds the default constitution's stage-2 prompt (about
    4,500 tokens with the tiny tokenizer), as `selfalign run`'s preflight requires."""
    from selfalign.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-long") / "model", context=8192)


def pytest_runtest_setup(item):
    """Tests marked `vllm` need vLLM (`make vllm`): skipped without it, unless
    SELFALIGN_REQUIRE_VLLM=1 (CI sets it), where a missing vLLM fails them instead of hiding them."""
    import importlib.util

    if "vllm" not in item.keywords or importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("SELFALIGN_REQUIRE_VLLM") == "1":
        pytest.fail("vLLM is not installed but SELFALIGN_REQUIRE_VLLM=1: run `make vllm`")
    pytest.skip("needs vLLM: make vllm")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The demo model as `make demo` builds it (about a minute): every stage keeps records."""
    from selfalign.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "model", log=lambda _: None)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """The tiny model with a head size vLLM's CPU attention supports (32), and room for the
    default constitution's stage-2 prompt (context 8192) so `selfalign run` can use it too."""
    from selfalign.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "model", heads=2, context=8192)
