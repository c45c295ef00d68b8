"""The backend contract: every backend has a `tokenizer` (or None) and `eos_token_ids`, each type
declares its capabilities before loading, and every stage refuses, in one line naming the config
key, a backend that cannot do what the stage was configured to do, before any work."""

import logging
import shutil

import pytest
from fake_openai import serve

from selfalign.errors import UserError
from selfalign.generation import (
    BackendConfig,
    SamplingParams,
    capabilities,
    load_backend,
    require,
)
from selfalign.generation.openai_backend import OpenAIBackend
from selfalign.generation.scripted import ScriptedBackend
from selfalign.generation.transformers_backend import TransformersBackend
from selfalign.stages import stage1_instructions as stage1
from selfalign.stages import stage2_self_align as stage2
from selfalign.stages import stage4_verbose as stage4

# loading an openai backend asks the server for GET /models: this one has no such endpoint, so
# the model name is not checked
SERVER_URL = serve(lambda body: {})[0]


def openai_cfg(model: str, **extra) -> BackendConfig:
    return BackendConfig(model=model, backend="openai", base_url=SERVER_URL, **extra)


@pytest.fixture
def server():
    """A loopback completions server that records every request and echoes the prompt."""
    url, seen, httpd = serve(lambda body: {"choices": [{"text": "echo", "finish_reason": "stop"}]})
    yield url, seen
    httpd.shutdown()


# -- tokenizer and EOS ids, per backend type --------------------------------------------------


def test_transformers_backend_has_its_tokenizer_and_generation_config_eos(tiny_model_dir):
    backend = TransformersBackend.load(str(tiny_model_dir), device="cpu", dtype="float32")
    eos = backend.tokenizer.eos_token_id
    assert backend.tokenizer is not None and backend.eos_token_ids == {eos}
    assert backend.capabilities == capabilities(BackendConfig(model=str(tiny_model_dir)))
    # a chat model that ends turns with a token of its own: that one is suppressed too
    backend.model.generation_config.eos_token_id = [eos, 7]
    again = TransformersBackend(backend.model, backend.tokenizer)
    assert again.eos_token_ids == {eos, 7}
    assert stage1.eos_bias(again) == {eos: -100.0, 7: -100.0}


def test_openai_backend_tokenizer_from_the_model_dir_or_none(tiny_model_dir, caplog):
    local = load_backend(openai_cfg(str(tiny_model_dir)))
    assert local.tokenizer is not None
    assert local.eos_token_ids == {local.tokenizer.eos_token_id}
    assert capabilities(openai_cfg(str(tiny_model_dir))).tokenizer
    with caplog.at_level(logging.INFO, logger="selfalign.generation.openai_backend"):
        served = load_backend(openai_cfg("served-model-name"))
    assert served.tokenizer is None and served.eos_token_ids == frozenset()
    assert not capabilities(openai_cfg("served-model-name")).tokenizer
    why = [r.getMessage() for r in caplog.records if "no tokenizer" in r.getMessage()]
    assert len(why) == 1 and "served-model-name" in why[0]
    assert OpenAIBackend("m", SERVER_URL).tokenizer is None


def test_openai_backend_tokenizer_from_the_hub_cache(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_backend(openai_cfg("org/tiny")).tokenizer is not None
    assert capabilities(openai_cfg("org/tiny")).tokenizer
    assert load_backend(openai_cfg("org/other")).tokenizer is None


def test_model_tokenizer_key(tiny_model_dir, tmp_path):
    cfg = openai_cfg("served-model-name", tokenizer=str(tiny_model_dir))
    assert capabilities(cfg).tokenizer
    assert load_backend(cfg).tokenizer.eos_token_id is not None
    with pytest.raises(UserError, match=r"^model.tokenizer: model .*no such directory"):
        load_backend(openai_cfg("served-model-name", tokenizer=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^model.tokenizer: .*cannot load its tokenizer"):
        load_backend(openai_cfg("served-model-name", tokenizer=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="tokenizer is for the openai backend"):
        BackendConfig(model=str(tiny_model_dir), tokenizer=str(tiny_model_dir))


def test_scripted_backend_tokenizer_is_given_or_none(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    assert ScriptedBackend(lambda p, s: "").tokenizer is None
    tokenizer = load_tokenizer(str(tiny_model_dir))
    backend = ScriptedBackend(lambda p, s: "", tokenizer=tokenizer)
    assert backend.eos_token_ids == {tokenizer.eos_token_id}


# -- capabilities and their errors ------------------------------------------------------------


def test_capabilities_are_known_without_a_model():
    caps = capabilities(openai_cfg("served-model-name"))
    assert (caps.backend, caps.token_logit_bias, caps.ngram_orders) == ("openai", True, {1})
    caps = capabilities(BackendConfig(model="/no/such/model"))  # nothing is loaded
    assert caps.ngram_orders == {1, 2, 3, 4} and caps.tokenizer


def test_stage_checks_name_the_key_and_the_fix():
    http = capabilities(openai_cfg("served-model-name"))
    with pytest.raises(UserError) as e:
        stage4.check_backend(stage4.VerboseConfig(), http)
    assert str(e.value) == (
        "stage 'verbose': backend 'openai' cannot apply n-gram penalties of orders 3, 4 "
        "(verbose.sampling.ngram_penalties); remove them, or run them in vLLM (model.backend: "
        "vllm, or model.server: vllm for a vLLM server) or with backend transformers"
    )
    with pytest.raises(UserError, match=r"^stage 'instructions': EOS suppression needs the "
                       r"model's tokenizer, and backend 'openai' has none; set model.tokenizer "
                       r".*, or switch it off with instructions.self_instruct.suppress_eos: false$"):  # fmt: skip
        stage1.check_backend(stage1.Stage1Config(), http)
    with pytest.raises(UserError, match=r"switch it off with self_align.apology_bias: 0$"):
        stage2.check_backend(stage2.SelfAlignConfig(), http)
    with pytest.raises(UserError, match=r"with topics.suppress_eos: false$"):
        stage1.check_backend(stage1.TopicsConfig(), http, section="")


def test_switching_the_feature_off_passes_the_checks():
    http = capabilities(openai_cfg("served-model-name"))
    off = {"suppress_eos": False}
    stage1.check_backend(stage1.Stage1Config(self_instruct=off, topics=off, questions=off), http)
    with pytest.raises(UserError, match="instructions.questions.suppress_eos"):
        stage1.check_backend(stage1.Stage1Config(self_instruct=off, topics=off), http)
    stage2.check_backend(stage2.SelfAlignConfig(apology_bias=0), http)
    verbose = stage4.VerboseConfig(sampling={"ngram_penalties": {1: 0.5}})
    stage4.check_backend(verbose, http.with_tokenizer(True))
    with pytest.raises(UserError, match="needs the engraved model's tokenizer"):
        stage4.check_backend(verbose, http)
    stage4.check_backend(verbose, http, tokenizer_given=True)


def test_a_canned_backend_needs_no_token_controls_but_can_stand_in_for_another():
    canned = ScriptedBackend(lambda p, s: "text")
    require(canned, SamplingParams(ngram_penalties={4: 1.0}))
    stage1.check_backend(stage1.Stage1Config(), canned)
    stage2.check_backend(stage2.SelfAlignConfig(), canned)
    with pytest.raises(UserError, match="chat template"):  # that, it does need
        stage4.check_backend(stage4.VerboseConfig(), canned)
    like_http = ScriptedBackend(lambda p, s: "text", capabilities=OpenAIBackend.CAPABILITIES)
    with pytest.raises(UserError, match=r"order 3 \(sampling.ngram_penalties\)"):
        like_http.generate(["a"], SamplingParams(ngram_penalties={3: 1.0}))
    with pytest.raises(UserError, match="backend 'openai' has none"):
        stage1.check_backend(stage1.SelfInstructConfig(), like_http)
    assert like_http.calls == []


# -- stages refuse before any work -------------------------------------------------------------


def test_stage1_with_an_http_backend_without_tokenizer_refuses_before_generating(server, tmp_path):
    url, seen = server
    cfg = stage1.SelfInstructConfig(num_instructions=2, prompts_per_round=2, max_rounds=1)
    for run, step in [(stage1.run_self_instruct, cfg), (stage1.run_topics, stage1.TopicsConfig())]:
        with pytest.raises(UserError, match="suppress_eos: false"):
            run(step, OpenAIBackend("m", url), tmp_path / "out")
    assert seen == [] and not (tmp_path / "out").exists()
    off = cfg.model_copy(update={"suppress_eos": False})
    stage1.run_self_instruct(off, OpenAIBackend("m", url), tmp_path / "out")
    assert len(seen) == 2 and "logit_bias" not in seen[0]


def test_stages_2_and_4_with_an_http_backend_refuse_before_reading_or_generating(server, tmp_path):
    url, seen = server
    missing = tmp_path / "missing.jsonl"  # never read: the check comes first
    with pytest.raises(UserError, match="apology_bias: 0"):
        stage2.run_self_align(stage2.SelfAlignConfig(), OpenAIBackend("m", url), missing, tmp_path)
    with pytest.raises(UserError, match="verbose.sampling.ngram_penalties"):
        stage4.run_verbose(stage4.VerboseConfig(), OpenAIBackend("m", url), missing, tmp_path, None)
    assert seen == []
