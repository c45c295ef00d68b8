"""One process per run directory (issue 12): a second `selfalign run`, or a stage command on a busy
out dir, is refused at once naming the holder's PID; two runs racing never both proceed; a stage
whose process was killed reads `interrupted` (not `running`) in `status` and the report.

The subprocess tests run the real CLI with the scripted model of `pipeline_fakes`, paused at a
chosen prompt (`pausing_run`) so the test knows where the other process is.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_run import run_main
from test_pipeline import write_config

TESTS = Path(__file__).parent
STAGE_2_PROMPT = "(internal thoughts):"  # how every stage-2 prompt ends

PAUSE = """
import os, time
_respond = pipeline_fakes.Responder.__call__
def _pausing(self, prompt, seed):
    # at the N-th prompt ending with SUFFIX: say so (entered-PID), then wait for the file `go`
    if prompt.endswith({suffix!r}):
        self.paused_calls = getattr(self, "paused_calls", 0) + 1
        if self.paused_calls == {n}:
            open(os.path.join({gate!r}, f"entered-{{os.getpid()}}"), "w").close()
            while not os.path.exists(os.path.join({gate!r}, "go")):
                time.sleep(0.05)
    return _respond(self, prompt, seed)
pipeline_fakes.Responder.__call__ = _pausing
"""


def pausing_run(
    tmp_path: Path, config: Path, *args: str, suffix: str = "", n: int = 1
) -> tuple[list[str], Path]:
    """(argv, gate): `selfalign run CONFIG --quiet ARGS` with the scripted model, which pauses at
    the n-th prompt ending with `suffix` (writing GATE/entered-PID) until GATE/go exists."""
    gate = tmp_path / "gate"
    gate.mkdir(exist_ok=True)
    script = tmp_path / "run_paused.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import pipeline_fakes\n"
        + PAUSE.format(suffix=suffix, n=n, gate=str(gate))
        + "pipeline_fakes.install()\n"
        "from selfalign.cli import main\n"
        f"sys.argv = ['selfalign', 'run', {str(config)!r}, '--quiet', *{list(args)!r}]\n"
        "main()\n"
    )
    return [sys.executable, str(script)], gate


def wait_for(condition, procs: list[subprocess.Popen], what: str) -> None:
    """Poll until `condition()`; a guard against hanging forever, not a timing check."""
    deadline = time.monotonic() + 300
    while not condition():
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


@contextmanager
def holding(directory: Path, name: str = ".lock"):
    """Hold DIR/NAME the way a selfalign process does (flock, PID inside), from this process: a
    command run in-process opens the file anew and finds it taken."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def entered(gate: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in gate.glob("entered-*")]


@pytest.mark.slow
def test_two_runs_racing_on_one_directory_never_both_proceed(tmp_path, pipeline_model_dir):
    config = write_config(tmp_path, pipeline_model_dir)
    argv, gate = pausing_run(tmp_path, config, "--stages", "1")
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]

    def settled() -> bool:  # each process is either working in stage 1 or gone
        return len(entered(gate)) + sum(p.poll() is not None for p in procs) >= len(procs)

    wait_for(settled, procs, "both processes to start")
    (winner,) = entered(gate)  # today: both get into stage 1
    (loser,) = [p for p in procs if p.pid != winner]
    err = loser.communicate()[1]
    assert loser.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert f"in use by PID {winner}" in err and "kill" in err and "Traceback" not in err

    (gate / "go").touch()
    (ok,) = [p for p in procs if p.pid == winner]
    assert ok.wait() == 0, ok.stderr.read()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["instructions"]["status"] == "done"


@pytest.mark.slow
def test_a_killed_stage_reads_interrupted_and_a_live_one_running(
    tmp_path, pipeline_model_dir, monkeypatch, capsys
):
    import pipeline_fakes

    config = write_config(tmp_path, pipeline_model_dir)
    run = tmp_path / "run"
    argv, gate = pausing_run(tmp_path, config, "--stages", "1-2", suffix=STAGE_2_PROMPT, n=6)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: entered(gate), [child], "the run to reach stage 2")
        # alive and holding the run: `running`, and a second run is refused naming it
        code, out, _ = run_main(monkeypatch, capsys, "status", str(run))
        assert code == 0 and "running" in out and "interrupted" not in out
        pipeline_fakes.install(monkeypatch)
        code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "1-2", "-q")
        assert code == 2 and f"in use by PID {child.pid}" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["self_align"]["status"] == "running"  # as the killed process left it
    code, out, _ = run_main(monkeypatch, capsys, "status", str(run))
    assert code == 0 and "interrupted" in out and "running" not in out  # today: running forever
    code, out, _ = run_main(monkeypatch, capsys, "report", str(run))
    assert code == 0 and 'class="interrupted">interrupted<' in Path(out.strip()).read_text()

    # the kernel dropped the lock with the process: a rerun takes the run and resumes stage 2
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "1-2", "-q")
    assert code == 0, err
    statuses = {
        n: s["status"] for n, s in json.loads((run / "manifest.json").read_text())["stages"].items()
    }
    assert statuses["instructions"] == statuses["self_align"] == "done"


BUSY = [
    ("merge-instructions", "--output", ""),
    ("self-instruct", "--output", ""),
    ("self-instruct", "--output", "1/2"),
    ("self-align", "--output", ""),
    ("engrave", "--output", ""),
    ("verbose-clone", "--output", ""),
]


@pytest.mark.parametrize(("command", "flag", "shard"), BUSY)
def test_a_stage_command_on_a_busy_out_dir_is_refused_naming_the_holder(
    command, flag, shard, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    out = tmp_path / "out"
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(json.dumps({"id": "a", "instruction": "Say hi."}) + "\n")
    model = ["--model", str(tiny_model_dir)]
    extra = {
        "self-instruct": model + (["--shard", shard] if shard else []),
        "self-align": ["--instructions", str(instructions), *model],
        "engrave": ["--data", str(instructions), *model],
        "verbose-clone": ["--data", str(instructions), *model, "--base", str(tiny_model_dir)],
    }.get(command, [])
    name = f".lock.shard{shard.replace('/', 'of')}" if shard else ".lock"
    with holding(out, name):
        before = sorted(p.name for p in out.iterdir())
        code, _, err = run_main(monkeypatch, capsys, command, flag, str(out), *extra)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert f"{out} is in use by PID {os.getpid()} " in err and "Traceback" not in err


def test_shards_of_one_job_share_their_out_dir(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shard_0 = subprocess.Popen(  # a process holding the out dir as `--shard 0/2` does
        [sys.executable, "-c", "import sys; from selfalign.run.lock import hold_out_dir; "
         f"hold_out_dir({str(out)!r}, '0/2'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert shard_0.stdout.readline() == "held\n"
        # shard 1 goes ahead (to the next thing it needs: a model)
        code, _, err = run_main(
            monkeypatch, capsys, "self-instruct", "--output", str(out), "--shard", "1/2"
        )
        assert code == 2 and "in use" not in err and "model" in err
        # a second shard 0 is refused
        code, _, err = run_main(
            monkeypatch, capsys, "self-instruct", "--output", str(out), "--shard", "0/2"
        )
        assert code == 2 and f"in use by PID {shard_0.pid} " in err
    finally:
        shard_0.communicate("")
