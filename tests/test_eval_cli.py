"""`selfalign eval`: the table and results.json, resume, bad input in one line, answers and a
judge (a fake judge server on 127.0.0.1), all on the tiny model."""

from __future__ import annotations

import json
import shutil

from cli_run import run_main
from fake_openai import serve

from selfalign.evaluation import harness

CPU = ("--device", "cpu", "--dtype", "float32")


def test_eval_prints_the_table_writes_the_json_and_resumes(
    chat_model_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "eval"
    args = ("eval", str(chat_model_dir), "--tasks", "truthfulqa_mc1,hhh_other", "--limit", "3",
            *CPU, "--output", str(out))  # fmt: skip
    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    scores = results["mc"]["model"]["raw"]["tasks"]
    assert set(scores) == {"truthfulqa_mc1", "hhh_other"} and scores["hhh_other"]["n"] == 3
    assert results["models"] == {"model": str(chat_model_dir)}
    row = next(line for line in stdout.splitlines() if line.startswith("truthfulqa_mc1"))
    assert f"{scores['truthfulqa_mc1']['acc']:.3f}" in row and " 3 " in row
    assert json.loads((out / "mc" / "model.raw.json").read_text())["tasks"] == scores

    def no_model(spec):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness, "make_lm", no_model)  # a rerun reads the scores written
    code, again, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert again == stdout


def test_bad_input_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    cases = [
        (("--tasks", "truthfulqa_mc3"), "unknown task 'truthfulqa_mc3'"),
        ((str(tmp_path / "absent"),), "no such model directory"),
        (("--answers", "vicuna", "--judge-url", "http://127.0.0.1:9/v1"), "--judge-model"),
    ]
    for extra, message in cases:
        model = () if extra and extra[0].startswith(str(tmp_path)) else (str(tiny_model_dir),)
        code, out, err = run_main(monkeypatch, capsys, "eval", *model, *extra, *CPU,
                                  "--output", str(tmp_path / "out"))  # fmt: skip
        assert code == 2, (extra, err)
        assert message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, out, err = run_main(monkeypatch, capsys, "eval", str(tiny_model_dir), "--tasks", "x")
    assert "hhh_harmless" in err and "truthfulqa_mc2" in err  # the available tasks are listed


def test_answers_and_a_judge_on_two_models(chat_model_dir, tmp_path, monkeypatch, capsys):
    """Two models answer two Vicuna questions; a judge that always says [[1]] (position bias)
    gives ties only, because each question is judged in both orders."""
    other = tmp_path / "other" / "model"
    shutil.copytree(chat_model_dir, other)
    reply = {"choices": [{"message": {"role": "assistant", "content": "Fine.\nVerdict: [[1]]"}}]}
    url, seen, httpd = serve(lambda body: reply)
    try:
        code, stdout, err = run_main(
            monkeypatch, capsys, "eval", str(chat_model_dir), str(other), "--answers", "vicuna",
            "--answers-limit", "2", "--max-tokens", "6", *CPU, "--judge-url", url,
            "--judge-model", "judge", "--output", str(tmp_path / "out"),
        )  # fmt: skip
    finally:
        httpd.shutdown()
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "mc" not in results  # --answers alone scores nothing
    labels = [f"{chat_model_dir.parent.name}_model", "other_model"]
    assert list(results["answers"]) == labels
    for label in labels:
        rows = [json.loads(line) for line in open(results["answers"][label])]
        assert [r["id"] for r in rows] == ["vicuna-1", "vicuna-2"]
    summary = results["judge"][f"{labels[0]}-vs-{labels[1]}"]
    assert summary["total"]["tie"] == 2 and summary["total"]["win"] == 0
    assert len(seen) == 4  # two questions, both orders
    assert "generic" in stdout  # the per-category table was printed
