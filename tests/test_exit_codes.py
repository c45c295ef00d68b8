"""What `selfalign` says and returns when a command stops early (issue 12): Ctrl-C -> 130 and
"interrupted; rerun to resume"; an unexpected error -> 1, one line and the log with its traceback
(`--debug` prints it); a full disk -> 1, one line naming the file and the space left, and the
manifest records `failed` with that reason (or the line says it could not).

The disk fills two ways: a fault-injecting file under the JSONL appender (and, for the worst case,
under the manifest's writer), and, as root where `mount -t tmpfs` works, a real tiny tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from cli_run import run_main
from test_lock import STAGE_2_PROMPT, entered, pausing_run, wait_for
from test_pipeline import all_ids_unique, write_config

import selfalign.run.pipeline as pipeline
from selfalign.jsonl import JsonlAppender, read_jsonl

NO_SPACE = os.strerror(errno.ENOSPC)


def manifest(run: Path) -> dict:
    """The manifest as its last writer left it (not as `status` reads it)."""
    return json.loads((run / "manifest.json").read_text())["stages"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# -- Ctrl-C ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_a_stage_exits_130_and_the_rerun_resumes(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    import pipeline_fakes

    config = write_config(tmp_path, pipeline_model_dir)
    run = tmp_path / "run"
    argv, gate = pausing_run(tmp_path, config, "--stages", "1-2", suffix=STAGE_2_PROMPT, n=6)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: entered(gate), [child], "the run to reach stage 2")
    child.send_signal(signal.SIGINT)  # as Ctrl-C in its terminal would
    _, err = child.communicate()

    assert child.returncode == 130, err  # today: 0, so `selfalign run ... && next` carried on
    assert err.strip().splitlines()[-1] == "interrupted; rerun to resume"
    assert "[self_align] interrupted" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    entry = manifest(run)["self_align"]
    assert (entry["status"], entry["error"]) == ("interrupted", "interrupted")
    raw_before = read_jsonl(run / "2_self_align" / "self_align.raw.jsonl")
    assert raw_before

    pipeline_fakes.install(monkeypatch)
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "1-2", "-q")
    assert code == 0, err
    assert "[instructions] done already, skipped" in err
    assert (
        read_jsonl(run / "2_self_align" / "self_align.raw.jsonl")[: len(raw_before)] == raw_before
    )
    assert manifest(run)["self_align"]["status"] == "done"


def test_ctrl_c_raised_inside_a_stage_is_recorded_and_exits_130(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_backend", interrupted)
    config = write_config(tmp_path, pipeline_model_dir)
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "-q")
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted; rerun to resume"
    assert "failed: KeyboardInterrupt" not in err
    entry = manifest(tmp_path / "run")["instructions"]
    assert (entry["status"], entry["error"]) == ("interrupted", "interrupted")


# -- unexpected errors -----------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_naming_the_log_of_its_traceback(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    def broken(cfg):
        raise RuntimeError("the model server went away\n(a second line of detail)")

    monkeypatch.setattr(pipeline, "load_backend", broken)
    config = write_config(tmp_path, pipeline_model_dir)
    run = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "-q")
    assert code == 1
    assert "Traceback" not in err and "second line" not in err
    (line,) = error_lines(err)
    assert line.startswith("error: RuntimeError: the model server went away; traceback in ")
    log = Path(line.rsplit("traceback in ", 1)[1])
    assert log.parent == run / "logs"
    assert "Traceback (most recent call last)" in log.read_text()
    assert "(a second line of detail)" in log.read_text()
    entry = manifest(run)["instructions"]
    assert entry["status"] == "failed"
    assert entry["error"] == f"RuntimeError: the model server went away (traceback in {log})"

    code, _, err = run_main(monkeypatch, capsys, "--debug", "run", str(config), "-q")
    assert code == 1 and "Traceback (most recent call last)" in err
    assert len(error_lines(err)) == 1


def test_an_unexpected_error_outside_a_run_is_logged_to_a_temp_file(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    import selfalign.generation.generate_file as generate_file

    def broken(cfg, input, output):
        raise ValueError("a bug")

    monkeypatch.setattr(generate_file, "run_generate", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hi"}\n')
    code, _, err = run_main(
        monkeypatch, capsys, "generate", "--input", str(prompts), "--output",
        str(tmp_path / "out.jsonl"), "--model", str(tiny_model_dir),
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    (log,) = tmp_path.glob("selfalign-*.log")
    assert line == f"error: ValueError: a bug; traceback in {log}"
    assert "raise ValueError" in log.read_text()


# -- a full disk -----------------------------------------------------------------------------------


class FullDisk:
    """A file that takes `room` more bytes (shared by every file it wraps), then fails the way a
    full disk fails a write: OSError ENOSPC, no file name."""

    def __init__(self, room: int):
        self.room = room
        self.full = False

    def wrap(self, file):
        disk = self

        class Faulty:
            def write(self, text):
                if len(text) > disk.room:
                    disk.full = True
                    raise OSError(errno.ENOSPC, NO_SPACE)
                disk.room -= len(text)
                return file.write(text)

            def __getattr__(self, name):
                return getattr(file, name)

        return Faulty()


def fill_disk_under_the_appender(monkeypatch, room: int) -> FullDisk:
    disk = FullDisk(room)
    opened = JsonlAppender.__init__

    def init(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        self._file = disk.wrap(self._file)

    monkeypatch.setattr(JsonlAppender, "__init__", init)
    return disk


def test_a_full_disk_is_one_line_naming_the_file_and_the_manifest_records_it(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    import pipeline_fakes

    pipeline_fakes.install(monkeypatch)
    fill_disk_under_the_appender(monkeypatch, room=12_000)
    config = write_config(tmp_path, pipeline_model_dir)
    run = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "-q")
    assert code == 1 and "Traceback" not in err  # today: an OSError traceback
    (line,) = error_lines(err)
    raw = run / "1_instructions" / "topics.raw.jsonl"  # the file that no longer fits
    assert line.startswith(f"error: {NO_SPACE} while writing {raw} (")
    assert " free there); free some space, then rerun to resume" in line
    entry = manifest(run)["instructions"]
    assert entry["status"] == "failed" and entry["error"] == line.removeprefix("error: ")


def test_a_disk_too_full_for_the_manifest_says_so(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    import pipeline_fakes

    import selfalign.run.manifest as manifest_module

    pipeline_fakes.install(monkeypatch)
    disk = fill_disk_under_the_appender(monkeypatch, room=12_000)
    written = manifest_module.write_text_atomic

    def write_manifest(path, text):
        if disk.full:
            raise OSError(errno.ENOSPC, NO_SPACE)
        written(path, text)

    monkeypatch.setattr(manifest_module, "write_text_atomic", write_manifest)
    config = write_config(tmp_path, pipeline_model_dir)
    run = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "-q")
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert f"{NO_SPACE} while writing {run / '1_instructions' / 'topics.raw.jsonl'}" in line
    assert line.endswith(f"; {run / 'manifest.json'} could not record it: {NO_SPACE}")
    # the stage stays `running` on disk; nobody holds the run any more, so it reads interrupted
    assert manifest(run)["instructions"]["status"] == "running"
    code, out, _ = run_main(monkeypatch, capsys, "status", str(run))
    assert code == 0 and "interrupted" in out


@pytest.fixture
def tiny_disk(tmp_path):
    """A 320 KiB tmpfs (root only; skipped where it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_fails_in_one_line_and_the_run_resumes_once_there_is_room(
    tiny_disk, tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    import pipeline_fakes

    pipeline_fakes.install(monkeypatch)
    run = tiny_disk / "run"
    config = write_config(tmp_path, pipeline_model_dir, run_dir=str(run))
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "1-2", "-q")
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {NO_SPACE} while writing {run}/")
    # the run's reserve was given back, so the manifest had room to say why
    (failed,) = [s for s in manifest(run).values() if s["status"] == "failed"]
    assert failed["error"] == line.removeprefix("error: ")

    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "1-2", "-q")
    assert code == 0, err
    assert [manifest(run)[s]["status"] for s in ("instructions", "self_align")] == ["done"] * 2
    all_ids_unique(run)
