"""`selfalign push` (offline only: --dry-run, and the hub client's offline mode as one clear
line) and the model card's `base_model`: the hub id when the base came from a hub, else none."""

from __future__ import annotations

import pytest
import yaml
from cli_run import run_main as cli

from selfalign.training.model_dir import hub_id, model_card
from selfalign.training.sft import TrainConfig

TOKEN = "hf_notARealTokenButSecret"


def _model(folder):
    for name in ("config.json", "README.md", "model.safetensors", "adapter/adapter_config.json",
                 "checkpoints/checkpoint-2/optimizer.pt", ".lock", "adapter/.tmp-x"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


@pytest.fixture
def run(tmp_path):
    _model(tmp_path / "run" / "3_engrave" / "model")
    _model(tmp_path / "run" / "4_verbose" / "model")
    (tmp_path / "run" / "4_verbose" / "model" / "final.txt").write_text("x")
    return tmp_path / "run"


@pytest.fixture
def no_hub(monkeypatch):
    """Any call to the hub fails the test: a dry run contacts nothing (though it could: there
    is a token)."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder"):
        monkeypatch.setattr(HfApi, name, refuse)


def test_dry_run_lists_the_final_model_files_and_the_repo(run, no_hub, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "push", str(run), "--repo", "me/quokka",
                         "--revision", "v1", "--dry-run")  # fmt: skip
    assert code == 0, err
    listed = [line.split()[-1] for line in out.splitlines()[:-1]]
    assert listed == ["README.md", "adapter/adapter_config.json", "config.json", "final.txt",
                      "model.safetensors"]  # fmt: skip
    assert "4_verbose/model" in out.splitlines()[-1] and "me/quokka@v1" in out.splitlines()[-1]


def test_stage_3_and_a_model_directory(run, no_hub, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "push", str(run), "--repo", "me/q", "--stage", "3",
                       "--dry-run")  # fmt: skip
    assert code == 0 and "3_engrave/model" in out and "final.txt" not in out
    model = run / "4_verbose" / "model"
    code, out, _ = cli(monkeypatch, capsys, "push", str(model), "--repo", "me/q", "--dry-run")
    assert code == 0 and "final.txt" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["RUN", "--repo", "not a repo"], "--repo 'not a repo'"),
        (["MODEL", "--repo", "me/q", "--stage", "3"], "is a model directory; --stage"),
        (["EMPTY", "--repo", "me/q"], "no trained model"),
        (["MISSING", "--repo", "me/q"], "no such directory"),
    ],
)
def test_bad_input_is_one_line(run, tmp_path, monkeypatch, capsys, args, message):
    paths = {"RUN": run, "MODEL": run / "4_verbose" / "model", "EMPTY": tmp_path,
             "MISSING": tmp_path / "x"}  # fmt: skip
    args = [str(paths.get(a, a)) for a in args]
    code, _, err = cli(monkeypatch, capsys, "push", *args, "--dry-run")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_offline_is_one_clear_line_and_the_token_stays_secret(run, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = cli(monkeypatch, capsys, "push", str(run), "--repo", "me/q")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: cannot push: the Hugging Face Hub client is in offline mode (HF_HUB_OFFLINE is "
        "set); unset it on a machine with network access and rerun"
    ]
    assert TOKEN not in out + err and "Traceback" not in out + err


@pytest.mark.parametrize(
    ("status", "server", "message"),
    [
        (401, None, "(401): the token was refused"),
        (403, None, "(403): the token may not write to me/q"),
        (400, "base_model is not a valid model id", "(400): base_model is not a valid model id"),
    ],
)
def test_a_refusal_by_the_hub_is_one_line(run, monkeypatch, capsys, status, server, message):
    import sys

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    http = sys.modules[HTTPError.__module__.split(".")[0]]  # the hub client's HTTP library
    url = "https://huggingface.co/api/repos/create"
    response = http.Response(status, request=http.Request("POST", url))

    def refuse(*args, **kwargs):
        raise HfHubHTTPError(f"{status} Client Error for url {url}", response=response,
                             server_message=server)  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = cli(monkeypatch, capsys, "push", str(run), "--repo", "me/q")
    assert code == 2 and f"error: push to me/q failed {message}" in err
    assert len(err.strip().splitlines()) == 1 and TOKEN not in out + err


def test_no_token_says_how_to_get_one(run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = cli(monkeypatch, capsys, "push", str(run), "--repo", "me/q")
    assert code == 2 and "no Hugging Face token: set HF_TOKEN" in err


# -- the model card's base_model ----------------------------------------------------------------


def test_hub_id_of_a_base_model(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "link").symlink_to(snapshot)
    (tmp_path / "local").mkdir()
    assert hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id, loaded from the hub
    assert hub_id("gpt2") == "gpt2"
    assert hub_id(str(snapshot)) == "Qwen/Qwen2.5-0.5B"  # the HF cache
    assert hub_id(str(tmp_path / "link")) == "Qwen/Qwen2.5-0.5B"  # a link into it
    assert hub_id(str(tmp_path / "local")) is None  # a model of one's own
    assert hub_id(str(tmp_path / "no" / "such" / "dir")) is None
    monkeypatch.chdir(tmp_path)
    assert hub_id("local") is None  # a folder here, though the name could be a hub id
    monkeypatch.chdir(snapshot)
    assert hub_id("org/other") == "org/other"  # not taken for the cached model it is run from


STATS = {
    "method": "lora", "examples": 4, "truncated": 0, "dropped_overlong": 0,
    "dropped_prompt_too_long": 0, "tokens": 239, "trained": 4, "steps": 12, "warmup_steps": 2,
    "micro_batch_size": 4, "gradient_accumulation": 1, "world_size": 1,
    "effective_batch_size": 4, "precision": "fp32", "train_loss": 2.8, "seconds": 1.7,
    "identity": {"name": "Quokka", "developer": "the Lab", "knowledge_cutoff": "2024-01"},
    "constitution": "default", "data_description": "aligned answers", "fingerprint": "0a1b",
}  # fmt: skip


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize(
    ("base", "expected"),
    [("org/base-model", "org/base-model"), ("/models--org--base/snapshots/r1", "org/base")],
)
def test_card_names_the_hub_base_model(base, expected):
    cfg = TrainConfig(model=base)
    card = model_card(cfg, {**STATS, "base_model": base}, "sft.jsonl", "selfalign engrave")
    assert _front_matter(card)["base_model"] == expected
    assert f"fine-tuned from `{expected}`" in card


def test_card_of_a_local_base_has_no_base_model(tmp_path):
    cfg = TrainConfig(model=str(tmp_path))
    card = model_card(cfg, {**STATS, "base_model": str(tmp_path)}, "sft.jsonl", "x")
    meta = _front_matter(card)
    assert "base_model" not in meta and meta["library_name"] == "transformers"
    assert f"fine-tuned from `{tmp_path}`" in card  # the reader still learns where it came from
