"""`selfalign run CONFIG --print-slurm DIR`: the Slurm scripts parse, chain in the right order,
match the shipped templates, and their commands, run shard by shard, make stages 1-2."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_run import run_main
from test_pipeline import write_config

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl
from selfalign.run.slurm import read_pipeline_config, slurm_scripts, write_scripts

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "configs" / "slurm"
SHARDS = 3


def scripts(config: Path, folder: Path, shards: int = SHARDS) -> dict[str, str]:
    """What `selfalign run CONFIG --print-slurm FOLDER --shards N` writes (and writes it)."""
    files = slurm_scripts(read_pipeline_config(config), config, folder, shards)
    write_scripts(folder, files)
    return files


def command_args(script: str, env: dict[str, str]) -> list[str]:
    """The arguments of the script's `selfalign` line, expanded by bash as the job would."""
    (line,) = [s for s in script.splitlines() if s.startswith("selfalign ")]
    words = line.removeprefix("selfalign ")
    out = subprocess.run(["bash", "-c", f"set -u; printf '%s\\0' {words}"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.split("\0")[:-1]


def submitted_order(submit: str) -> list[tuple[str, list[str], str]]:
    """(job, jobs it waits for, script) per sbatch call of submit.sh, in order."""
    calls = re.findall(r"^(\w+)=\$\(submit (?:--dependency=afterok:(\S+) )?(.+)\)$", submit, re.M)
    return [(job, [a.lstrip("$") for a in after.split(":")] if after else [], shlex.split(f)[0])
            for job, after, f in calls]  # fmt: skip


def test_shipped_templates_are_what_print_slurm_writes():
    config = Path("configs/paper.yaml")
    expected = slurm_scripts(read_pipeline_config(ROOT / config), config, "configs/slurm", 8)
    shipped = {p.name: p.read_text(encoding="utf-8") for p in SHIPPED.iterdir()}
    assert shipped == expected, "regenerate: selfalign run configs/paper.yaml --print-slurm ..."
    # the stage commands accept the stage files (their --config models forbid unknown keys)
    from selfalign.cli.instructions import Stage1File
    from selfalign.cli.self_align import SelfAlignFile
    from selfalign.config import build_config

    assert (
        build_config(Stage1File, SHIPPED / "stage1.yaml").self_instruct.num_instructions == 267597
    )
    assert build_config(SelfAlignFile, SHIPPED / "self_align.yaml").self_align.min_chars == 160


def test_scripts_parse_and_chain_in_order(tmp_path, tiny_model_dir):
    folder = tmp_path / "slurm dir"  # a space: every path must be quoted
    files = scripts(write_config(tmp_path, tiny_model_dir), folder)
    for name, text in files.items():
        if name.endswith((".sbatch", ".sh")):
            subprocess.run(["bash", "-n"], input=text, text=True, check=True)
            # sbatch reads #SBATCH lines only above the first command
            lines = text.splitlines()
            first = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
            assert not any(line.startswith("#SBATCH") for line in lines[first:]), name
    order = submitted_order(files["submit.sh"])
    assert [job for job, _, _ in order] == [
        "self_instruct", "topics", "questions", "merge", "self_align", "finalize", "train"
    ]  # fmt: skip
    seen = set()
    for job, after, script in order:
        assert set(after) <= seen, f"{job} waits for a job not yet submitted"
        assert Path(script).parent == folder and Path(script).name in files
        seen.add(job)
    waits = {job: set(after) for job, after, _ in order}
    assert waits["questions"] == {"topics"}  # the questions read the topics
    assert waits["merge"] == {"self_instruct", "questions"}
    assert waits["self_align"] == {"merge"}
    assert waits["finalize"] == {"self_align"} and waits["train"] == {"finalize"}
    for name in ("1a_self_instruct.sbatch", "1c_questions.sbatch", "2a_self_align.sbatch"):
        assert f"#SBATCH --array=0-{SHARDS - 1}" in files[name]
    # one task resubmitted with more rounds, as the merge advises when the shards stopped short
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "1", "SHARDS": "3"}
    args = command_args(files["1a_self_instruct.sbatch"], env)
    assert args[-2:] == ["--shard", "1/3"]
    assert command_args(files["1a_self_instruct.sbatch"], env | {"ROUNDS": "7"})[-4:] == [
        "--shard", "1/3", "--rounds", "7"
    ]  # fmt: skip


def test_print_slurm_refuses_to_overwrite_other_files(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    config, folder = write_config(tmp_path, tiny_model_dir), tmp_path / "slurm"
    code, out, err = run_main(monkeypatch, capsys, "run", str(config), "--print-slurm", str(folder))
    assert code == 0 and "submit.sh" in out, err
    again = run_main(monkeypatch, capsys, "run", str(config), "--print-slurm", str(folder))
    assert again.code == 0, again.err  # the same files: nothing to refuse
    code, out, err = run_main(monkeypatch, capsys, "run", str(config), "--print-slurm",
                              str(folder), "--shards", "4")  # fmt: skip
    assert code == 2 and "exists with other content" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="--shards 0"):
        scripts(config, tmp_path / "other", shards=0)
    assert write_scripts(folder, {"extra.txt": "x"}) == [folder / "extra.txt"]


# -- the commands, shard by shard, against one process ---------------------------------------------


def run_job(monkeypatch, capsys, script: str, task: int | None) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    if task is not None:
        env |= {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(SHARDS)}
    args = command_args(script, env)
    code, out, err = run_main(monkeypatch, capsys, *args)
    if code:
        pytest.fail(f"selfalign {shlex.join(args)}: {err}")


def run_sharded(monkeypatch, capsys, files: dict[str, str], start: str, stop: str) -> None:
    """The jobs from script `start` to before `stop`, in submission order, each array task in
    turn."""
    names = [script.split("/")[-1] for _, _, script in submitted_order(files["submit.sh"])]
    for name in names[names.index(start) : names.index(stop)]:
        array = "#SBATCH --array=" in files[name]
        for task in range(SHARDS) if array else [None]:
            run_job(monkeypatch, capsys, files[name], task)


@pytest.fixture
def scripted(monkeypatch):
    """The pipeline's scripted model, also for the stage commands (they load their own)."""
    import pipeline_fakes

    import selfalign.generation
    import selfalign.run.pipeline

    pipeline_fakes.install(monkeypatch)
    monkeypatch.setattr(selfalign.generation, "load_backend", selfalign.run.pipeline.load_backend)


def by_id(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(path)}


def single_run(monkeypatch, capsys, config: Path, run: Path) -> None:
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--run-dir", str(run),
                            "--stages", "1-2", "--quiet")  # fmt: skip
    assert code == 0, err


def test_sharded_stages_1_2_equal_a_single_process(tmp_path, pipeline_model_dir, monkeypatch, capsys,
                                                   scripted):  # fmt: skip
    # a target that takes several rounds of every shard
    more = {"instructions.self_instruct.num_instructions": 40,
            "instructions.self_instruct.max_rounds": 20}  # fmt: skip
    config = write_config(tmp_path, pipeline_model_dir, **more)
    single_run(monkeypatch, capsys, config, tmp_path / "single")
    files = scripts(config, tmp_path / "slurm")
    run_sharded(monkeypatch, capsys, files, "1a_self_instruct.sbatch", "3_train.sbatch")
    sharded, single = tmp_path / "run", tmp_path / "single"
    steps = json.loads((single / "manifest.json").read_text())["stages"]["instructions"]
    assert steps["counts"]["steps"]["self_instruct"]["rounds"] > SHARDS
    for name in ("1_instructions/instructions.jsonl", "2_self_align/aligned.jsonl",
                 "1_instructions/self_instruct.jsonl", "1_instructions/rejected.jsonl"):  # fmt: skip
        assert by_id(sharded / name) == by_id(single / name), name
    # the shards made the single run's prompts (no shard tag in their ids), each its own rounds
    single_raw = by_id(single / "1_instructions/self_instruct.raw.jsonl")
    for i in range(SHARDS):
        raw = read_jsonl(sharded / f"1_instructions/self_instruct.shard{i}of{SHARDS}.raw.jsonl")
        assert {r["round"] % SHARDS for r in raw} == {i}
        assert all(r["prompt_sha"] == single_raw[r["id"]]["prompt_sha"] for r in raw
                   if r["id"] in single_raw)  # fmt: skip


def test_sharded_tgrt_and_self_align_equal_a_single_process(tmp_path, pipeline_model_dir, monkeypatch,
                                                            capsys, scripted):  # fmt: skip
    """What sharding keeps exact today: the TGRT questions (content-addressed prompt ids) and
    stage 2 on the same instructions (one seed per instruction id)."""
    config = write_config(tmp_path, pipeline_model_dir)
    single, sharded = tmp_path / "single", tmp_path / "run"
    single_run(monkeypatch, capsys, config, single)
    files = scripts(config, tmp_path / "slurm")
    run_sharded(monkeypatch, capsys, files, "1a_self_instruct.sbatch", "2a_self_align.sbatch")

    def tgrt(run: Path) -> dict[str, dict]:
        # the merge's nearest neighbour of a question may be a self-instruct row, which differs
        rows = by_id(run / "1_instructions/instructions.jsonl").values()
        drop = ("max_similarity", "most_similar")
        return {r["id"]: {k: v for k, v in r.items() if k not in drop}
                for r in rows if r["source"] == "tgrt"}  # fmt: skip

    questions = {}
    for path in (sharded / "1_instructions").glob("tgrt_questions.shard*of3.jsonl"):
        questions |= by_id(path)
    assert questions == by_id(single / "1_instructions/tgrt_questions.jsonl")
    assert tgrt(sharded) and tgrt(sharded) == tgrt(single)
    # stage 2, sharded, on the single run's instructions
    shutil.copy(single / "1_instructions/instructions.jsonl",
                sharded / "1_instructions/instructions.jsonl")  # fmt: skip
    run_sharded(monkeypatch, capsys, files, "2a_self_align.sbatch", "3_train.sbatch")
    for name in ("aligned.jsonl", "sft.jsonl", "rejected.jsonl"):
        assert by_id(sharded / "2_self_align" / name) == by_id(single / "2_self_align" / name)
    assert len(list((sharded / "2_self_align").glob("self_align.shard*of3.raw.jsonl"))) == SHARDS


def test_training_job_accepts_the_sharded_stages(tmp_path, pipeline_model_dir, monkeypatch,
                                                 capsys, scripted):  # fmt: skip
    from selfalign.run.manifest import Manifest
    from selfalign.run.pipeline import Pipeline
    from selfalign.run.registry import names
    from selfalign.run.settings import load_pipeline_config, parse_stages

    config = write_config(tmp_path, pipeline_model_dir)
    files = scripts(config, tmp_path / "slurm")
    run_sharded(monkeypatch, capsys, files, "1a_self_instruct.sbatch", "3_train.sbatch")
    (args,) = [command_args(files["3_train.sbatch"], {})]
    assert args[:2] == ["run", str(config)] and "3-" in args
    cfg = load_pipeline_config(config)
    todo = Pipeline(cfg).plan(Manifest.load(tmp_path / "run", names()), parse_stages("3-"), [])
    assert [t.stage.name for t in todo] == ["engrave", "verbose", "evaluate"]


@pytest.mark.slow
def test_training_job_runs_after_the_sharded_stages(tmp_path, pipeline_model_dir, monkeypatch,
                                                    capsys, scripted):  # fmt: skip
    """The whole chain as submit.sh runs it: stages 1-2 adopted (in the manifest), 3-5 run."""
    from selfalign.run.registry import names

    files = scripts(write_config(tmp_path, pipeline_model_dir), tmp_path / "slurm")
    run_sharded(monkeypatch, capsys, files, "1a_self_instruct.sbatch", "3_train.sbatch")
    run_job(monkeypatch, capsys, files["3_train.sbatch"], None)
    stages = json.loads((tmp_path / "run/manifest.json").read_text())["stages"]
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(names(), "done")
    assert stages["instructions"]["adopted_from"] == "1_instructions/stage.json"
    assert stages["self_align"]["counts"]["kept"] == len(read_jsonl(
        tmp_path / "run/2_self_align/aligned.jsonl"))  # fmt: skip


def test_training_job_refuses_sharded_stages_that_do_not_fit(tmp_path, pipeline_model_dir,
                                                             monkeypatch, capsys, scripted):  # fmt: skip
    """Adoption is honest: other settings, changed outputs, outputs made from other inputs, or
    no record are each refused in one line saying what differs or what to run."""
    from selfalign.run.manifest import Manifest
    from selfalign.run.pipeline import Events, Pipeline
    from selfalign.run.registry import names
    from selfalign.run.settings import load_pipeline_config, parse_stages

    config = write_config(tmp_path, pipeline_model_dir)
    run_sharded(monkeypatch, capsys, scripts(config, tmp_path / "slurm"), "1a_self_instruct.sbatch",
                "3_train.sbatch")  # fmt: skip
    run = tmp_path / "run"

    def plan() -> list[str]:
        cfg = load_pipeline_config(config)
        manifest = Manifest.load(run, names())
        todo = Pipeline(cfg, Events(quiet=True)).plan(manifest, parse_stages("3-"), [])
        return [t.stage.name for t in todo]

    write_config(tmp_path, pipeline_model_dir, **{"instructions.merge.seed": 7})
    code, _, err = run_main(monkeypatch, capsys, "run", str(config), "--stages", "3-", "--quiet")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "1_instructions/stage.json: stage 'instructions' made by the stage commands ran with " \
           "other settings" in err and "(instructions.merge.seed)" in err  # fmt: skip
    assert (
        not (run / "manifest.json").exists()
        or "adopted_from" not in (run / "manifest.json").read_text()
    )
    write_config(tmp_path, pipeline_model_dir)
    assert plan() == ["engrave", "verbose", "evaluate"]

    sft = run / "2_self_align/sft.jsonl"
    kept = sft.read_bytes()
    sft.write_bytes(kept + b'{"id": "extra"}\n')
    with pytest.raises(UserError, match=r"sft.jsonl is missing or changed since stage.json"):
        plan()
    sft.write_bytes(kept)
    instructions = run / "1_instructions/instructions.jsonl"
    merged = instructions.read_bytes()
    instructions.write_bytes(merged.splitlines(keepends=True)[0])
    with pytest.raises(UserError, match=r"2_self_align/stage.json: .* made from another "
                       r".*instructions.jsonl than the run's"):  # fmt: skip
        plan()
    instructions.write_bytes(merged)
    (run / "2_self_align/stage.json").unlink()
    with pytest.raises(UserError, match=r"needs stage 'self_align' .* not done; include it"):
        plan()
