"""Tiny Llama-architecture models built offline, for tests, benchmarks and the demo.

The tokenizer is a byte-level BPE trained on the spot with `tokenizers` (every string encodes,
nothing is downloaded); the model is a randomly initialised `LlamaForCausalLM`. Both are saved
with `save_pretrained` and then loaded through the same code as any real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.",
    "Instruction: Write a short poem about the sea.\nInput: \nOutput: Waves roll in, the tide goes out.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation , . ; : ! ? ( ) [ ] { } ' \" - _ / #",
    "Science explains the world: water boils at 100 degrees Celsius at sea level.",
    "1. Brainstorm topics.\n2. Ask questions.\n3. Answer them helpfully, honestly and harmlessly.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer that adds <s> in front of every sequence, as Llama does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    path: str | Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    context: int = 2048,
    seed: int = 0,
    initializer_range: float = 0.2,
    intermediate_size: int | None = None,
) -> Path:
    """Build and save a tiny causal LM + tokenizer under `path`; return the path.

    A wide `initializer_range` gives peaked next-token distributions, so greedy decoding of an
    untrained model has clear winners instead of near-ties that float noise could flip.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = train_tokenizer(corpus or DEFAULT_CORPUS, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
