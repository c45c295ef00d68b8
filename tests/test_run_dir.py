"""`selfalign run` on a finished run directory, and the commands that read one.

One scripted run (stages 1, 2 and 4 generate through `pipeline_fakes`, stages 3 and 4 train the
tiny model) is made once per module; each test works on its own copy of it: a forced middle
stage, stale later stages, "needs stage X", a changed constitution file, a failing stage, `status`,
`report`, `export` and `--log-json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_run import run_main
from test_pipeline import all_ids_unique, write_config

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl
from selfalign.run.pipeline import run_pipeline
from selfalign.run.settings import load_pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pipeline_model_dir):
    """(config path, run dir) of a finished run whose constitution is a file of its own."""
    import pipeline_fakes

    from selfalign.text.constitution import bundled_dir

    root = tmp_path_factory.mktemp("finished")
    constitution = root / "constitution.yaml"
    constitution.write_text((bundled_dir() / "default.yaml").read_text())
    config = write_config(root, pipeline_model_dir, constitution=str(constitution))
    with pytest.MonkeyPatch.context() as mp:
        pipeline_fakes.install(mp)
        run_pipeline(load_pipeline_config(config))
    return config, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path, monkeypatch):
    """A private copy of the finished run and a config pointing at it; the fake model installed."""
    import pipeline_fakes

    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = yaml.safe_load(config.read_text())
    data["run_dir"] = str(copy)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    pipeline_fakes.install(monkeypatch)
    return path, copy


def mtimes(run: Path, *paths: str) -> dict[str, int]:
    return {p: (run / p).stat().st_mtime_ns for p in paths}


STAGE_FILES = (
    "1_instructions/instructions.jsonl",
    "2_self_align/sft.jsonl",
    "3_engrave/model/model.safetensors",
    "4_verbose/verbose.jsonl",
    "4_verbose/model/model.safetensors",
    "5_evaluate/results.json",
)


def statuses(run: Path) -> dict[str, str]:
    manifest = json.loads((run / "manifest.json").read_text())
    return {name: s["status"] for name, s in manifest["stages"].items()}


def test_force_of_a_middle_stage_redoes_it_and_every_later_stage(run_copy, monkeypatch, capsys):
    config, run = run_copy
    before = mtimes(run, *STAGE_FILES)
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--force", "self_align", "-q")
    assert code == 0, err
    after = mtimes(run, *STAGE_FILES)
    assert after[STAGE_FILES[0]] == before[STAGE_FILES[0]]  # stage 1 untouched
    for path in STAGE_FILES[1:]:
        assert after[path] != before[path], f"{path} was not rebuilt"
    assert set(statuses(run).values()) == {"done"}
    all_ids_unique(run)
    assert not any((run / ".trash").iterdir())  # set-aside outputs go once the redo succeeds


def test_force_outside_the_selected_stages_is_refused_and_deletes_nothing(
    run_copy, monkeypatch, capsys
):
    config, run = run_copy
    before = mtimes(run, *STAGE_FILES)
    config_text = (run / "config.yaml").read_text()
    for args in (
        ("--stages", "1", "--force", "self_align"),
        ("--stages", "4", "--force", "engrave"),
    ):
        code, _, err = run_main(monkeypatch, capsys, "run", str(config), *args)
        assert code == 2 and "not among the stages to run" in err, err
        assert len(err.strip().splitlines()) == 1
    assert mtimes(run, *STAGE_FILES) == before
    assert set(statuses(run).values()) == {"done"}
    assert (run / "config.yaml").read_text() == config_text


def test_forced_stage_marks_later_unselected_stages_stale_then_redoes_them(
    run_copy, monkeypatch, capsys
):
    config, run = run_copy
    before = mtimes(run, *STAGE_FILES)
    code, _, err = run_main(
        monkeypatch, capsys, "run", str(config), "--stages", "1-2", "--force", "self_align", "-q"
    )
    assert code == 0, err
    assert statuses(run) == {"instructions": "done", "self_align": "done",
                             "engrave": "stale", "verbose": "stale", "evaluate": "stale"}  # fmt: skip
    # stale outputs are kept until the stage is redone
    assert mtimes(run, *STAGE_FILES[2:]) == {p: before[p] for p in STAGE_FILES[2:]}
    code, out, _ = run_main(monkeypatch, capsys, "status", str(run))
    assert code == 0 and out.count("stale") == 3

    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "3-", "-q")
    assert code == 0, err
    assert set(statuses(run).values()) == {"done"}
    after = mtimes(run, *STAGE_FILES)
    assert all(after[p] != before[p] for p in STAGE_FILES[2:])


def test_a_stage_whose_input_stage_is_not_done_is_refused_before_any_work(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    import pipeline_fakes

    pipeline_fakes.install(monkeypatch)
    config = write_config(tmp_path, pipeline_model_dir)
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "3-")
    assert code == 2
    assert "stage 'engrave' needs stage 'self_align' (2_self_align/sft.jsonl)" in err
    assert "--stages 2-3" in err
    run = tmp_path / "run"
    assert not (run / "3_engrave").exists() and not (run / "config.yaml").exists()


def test_an_edited_constitution_file_after_stage_2_is_refused(finished, run_copy, monkeypatch):
    config, run = run_copy
    constitution = Path(yaml.safe_load(config.read_text())["constitution"])
    original = constitution.read_text()
    try:
        constitution.write_text(original.replace("puts their safety", "puts their comfort"))
        with pytest.raises(
            UserError, match=r"'self_align'.*constitution_content.*--force self_align"
        ):
            run_pipeline(load_pipeline_config(config), report=False)
    finally:
        constitution.write_text(original)
    assert set(statuses(run).values()) == {"done"}


def test_a_failing_stage_is_marked_failed_and_the_command_fails(run_copy, monkeypatch, capsys):
    config, run = run_copy
    weights = (run / "3_engrave" / "model" / "model.safetensors").read_bytes()
    code, _, err = run_main(
        monkeypatch, capsys, "run", str(config), "engrave.model=/nonexistent/base",
        "--force", "engrave", "-q",
    )  # fmt: skip
    assert code == 2 and err.count("/nonexistent/base") == 1  # said once, as the last line
    assert "/nonexistent/base" in err.strip().splitlines()[-1]
    # the failed redo lost nothing: the previous model waits in .trash
    (kept,) = (run / ".trash").glob("3_engrave-*")
    assert (kept / "model" / "model.safetensors").read_bytes() == weights
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["stages"]["engrave"]
    assert entry["status"] == "failed" and "/nonexistent/base" in entry["error"]
    assert manifest["stages"]["verbose"]["status"] == "stale"  # its input is being redone
    code, out, _ = run_main(monkeypatch, capsys, "status", str(run))
    assert code == 0 and "failed" in out


def test_status_report_and_export_read_the_run(run_copy, monkeypatch, capsys, tmp_path):
    _, run = run_copy
    manifest = json.loads((run / "manifest.json").read_text())
    code, out, _ = run_main(monkeypatch, capsys, "status", str(run))
    assert code == 0
    for name in manifest["stages"]:
        assert name in out
    assert f"kept={manifest['stages']['self_align']['counts']['kept']}" in out

    shutil.rmtree(run / "report")
    code, out, _ = run_main(monkeypatch, capsys, "report", str(run))
    assert code == 0 and Path(out.strip()) == run / "report" / "index.html"
    assert "Funnel per stage" in (run / "report" / "index.html").read_text()

    out_dir = tmp_path / "exported"
    code, out, _ = run_main(monkeypatch, capsys, "export", str(run), "--format", "sharegpt",
                            "--output", str(out_dir))  # fmt: skip
    assert code == 0
    for name, rel in (
        ("self_align", "2_self_align/sft.jsonl"),
        ("verbose", "4_verbose/verbose.jsonl"),
    ):
        rows = read_jsonl(out_dir / f"{name}.jsonl")
        assert [r["id"] for r in rows] == [str(r["id"]) for r in read_jsonl(run / rel)]
        assert f"{name} {len(rows)} rows" in out


def test_commands_on_a_damaged_or_missing_run_give_one_line(
    run_copy, monkeypatch, capsys, tmp_path
):
    config, run = run_copy
    (run / "manifest.json").write_text('{"stages": {"instructions": ')
    for args in (("status", str(run)), ("report", str(run)), ("run", str(config))):
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert code == 2, args
        assert "manifest.json: damaged" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(monkeypatch, capsys, "status", str(tmp_path / "nowhere"))
    assert code == 2 and "no manifest.json" in err


def test_log_json_prints_one_event_per_line(run_copy, monkeypatch, capsys):
    config, _ = run_copy
    code, out, err = run_main(monkeypatch, capsys, "run", str(config), "--log-json")
    assert code == 0
    events = [json.loads(line) for line in err.strip().splitlines()]
    assert [e["event"] for e in events] == ["stage_skipped"] * 5 + ["run_done"]
    assert [e.get("stage") for e in events[:4]] == [
        "instructions",
        "self_align",
        "engrave",
        "verbose",
    ]
    assert all(isinstance(e["time"], float) for e in events)
    assert "report" in events[-1]


def test_bad_force_and_non_run_directories_are_refused_without_writing(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    config = write_config(tmp_path, pipeline_model_dir)
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--force", "bogus")
    assert code == 2 and "'bogus': not a stage" in err
    assert not (tmp_path / "run").exists()

    elsewhere = tmp_path / "documents"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    for args in (
        ("report", str(elsewhere)),
        ("export", str(elsewhere), "--output", str(tmp_path / "x")),
    ):
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and "not a selfalign run directory" in err, args
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "x").exists()
