"""A scripted stand-in for a base model that writes well-formed completions for every stage.

Used by the pipeline tests (in process, and in a subprocess that is killed with SIGKILL): stages 1,
2 and 4 generate through it, stages 3 and 4 train the real tiny model for a couple of steps.
"""

from __future__ import annotations

import os
import random
import re
import signal

WORDS = (
    "river garden ancient copper violin harbor lantern meadow puzzle rocket silver tunnel "
    "whisper orchard canyon glacier marble pepper saddle thunder velvet walnut yellow zebra "
    "anchor bamboo candle dolphin ember falcon granite hazel island jasmine kettle lemon "
    "mango nectar oyster pebble quartz raven spruce tulip umber violet willow basil cedar"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Responder:
    """`respond(prompt, seed)` for ScriptedBackend; SIGKILLs itself after `kill_after` stage-2
    prompts when asked to (to simulate a crash in the middle of stage 2)."""

    def __init__(self, kill_after: int | None = None):
        self.kill_after = kill_after
        self.self_align_calls = 0

    def __call__(self, prompt: str, seed: int) -> str:
        rng = random.Random(seed)
        tail = prompt[-200:]
        if tail.endswith("(internal thoughts):"):
            self.self_align_calls += 1
            if self.kill_after is not None and self.self_align_calls > self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return (
                " I am a helpful, honest and careful assistant. The user asks a plain question. "
                "I should follow principles 2 (informative), 3 (helpful).\n\n"
                f"Orion: The {_words(rng, 6)} is the answer you need.\n\nUser: thanks"
            )
        if tail.endswith("### Assistant\n"):
            return f"Here is a thorough answer: {_words(rng, 30)}.</s>"
        if m := re.search(r"(\d+)\. Instruction:$", tail):
            n = int(m[1])
            first = f" {_words(rng, 8).capitalize()}\n{n}. Input:\n<noinput>\n"
            return (
                first
                + f"###\n{n + 1}. Instruction: {_words(rng, 7).capitalize()}\n{n + 1}. Input:\n<noinput>\n###"
            )
        if tail.endswith("instruction:"):
            return f" {_words(rng, 7).capitalize()}?\n"
        if m := re.search(r"(\d+)\.$", tail):
            n = int(m[1])
            return f" {_words(rng, 2).title()}\n{n + 1}. {_words(rng, 1).title()}\n"
        raise AssertionError(f"unexpected prompt ending: {tail[-80:]!r}")


def install(monkeypatch_or_none=None, kill_after: int | None = None, server: bool = False):
    """Make the pipeline generate with the Responder. Like a transformers backend it has the
    model's tokenizer; with `server=True` it is like an OpenAI-compatible server instead: no
    tokenizer, order-1 n-gram penalties only (stage 4 then takes the engraved model's tokenizer)."""
    from transformers import AutoTokenizer

    import selfalign.run.pipeline as pipeline
    from selfalign.generation.openai_backend import OpenAIBackend
    from selfalign.generation.scripted import ScriptedBackend

    responder = Responder(kill_after)

    def load_backend(cfg):
        if server:
            return ScriptedBackend(
                responder, cfg.batch_size, capabilities=OpenAIBackend.CAPABILITIES
            )
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        return ScriptedBackend(responder, cfg.batch_size, tokenizer=tokenizer)

    if monkeypatch_or_none is None:
        pipeline.load_backend = load_backend
    else:
        monkeypatch_or_none.setattr(pipeline, "load_backend", load_backend)
    return responder
