"""`selfalign configs` and `selfalign configs copy`: the example configs ship inside the package
(so a pip install has them) and the repo-root `configs/` the Makefile and README use is them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from cli_run import run_main

REPO = Path(__file__).resolve().parents[1]
NAMES = ["demo", "paper", "small-gpu"]


def bundled_text(name: str) -> str:
    return (resources.files("selfalign") / "configs" / f"{name}.yaml").read_text()


def test_the_package_holds_the_three_configs():
    folder = resources.files("selfalign") / "configs"
    assert sorted(f.name for f in folder.iterdir() if f.name.endswith(".yaml")) == [
        f"{n}.yaml" for n in NAMES
    ]


def test_the_repo_root_configs_are_the_bundled_ones():
    """`make demo` runs `selfalign run configs/demo.yaml` from the repo root."""
    assert (REPO / "configs").resolve() == (REPO / "src" / "selfalign" / "configs").resolve()
    assert "configs/demo.yaml" in (REPO / "Makefile").read_text()
    assert (REPO / "configs" / "demo.yaml").read_text() == bundled_text("demo")


def test_list_shows_each_name_with_its_first_comment_line(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "configs")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    for name, line in zip(NAMES, lines, strict=True):
        first = next(x for x in bundled_text(name).splitlines() if x.startswith("#"))
        assert line.split(None, 1)[1] == first.lstrip("# ").removesuffix(":")


def test_copy_writes_the_config_to_a_file_or_into_a_folder(tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "configs", "copy", "small-gpu",
                              str(tmp_path / "mine.yaml"))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "mine.yaml").read_text() == bundled_text("small-gpu")
    code, out, err = run_main(monkeypatch, capsys, "configs", "copy", "paper.yaml", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "paper.yaml").read_text() == bundled_text("paper")
    assert out.strip() == str(tmp_path / "paper.yaml")


def test_copy_refuses_to_overwrite_unless_forced(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "demo.yaml"
    dest.write_text("mine\n")
    code, _, err = run_main(monkeypatch, capsys, "configs", "copy", "demo", str(dest))
    assert code == 2 and err.strip().splitlines() == [
        f"error: {dest} exists; pass --force to overwrite it"
    ]
    assert dest.read_text() == "mine\n"
    code, _, err = run_main(monkeypatch, capsys, "configs", "copy", "demo", str(dest), "--force")
    assert code == 0, err
    assert dest.read_text() == bundled_text("demo")


@pytest.mark.parametrize("dest", ["out.yaml", "no-such-folder/out.yaml"])
def test_unknown_name_or_folder_is_one_line(tmp_path, monkeypatch, capsys, dest):
    name = "demo" if "/" in dest else "tiny"
    code, _, err = run_main(monkeypatch, capsys, "configs", "copy", name, str(tmp_path / dest))
    assert code == 2 and len(err.strip().splitlines()) == 1
    if name == "tiny":
        assert "no bundled config 'tiny'; choose one of: demo, paper, small-gpu" in err
    else:
        assert "no-such-folder: no such folder" in err
    assert not (tmp_path / dest).exists()


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_configs(tmp_path):
    """Built as pip would (PEP 517 hooks of setuptools), from a copy of the source tree."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    script = ("from setuptools import build_meta as b; "
              "print('built', b.build_wheel('dist'), b.build_sdist('dist'))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _, wheel, sdist = next(x for x in done.stdout.splitlines() if x.startswith("built ")).split()
    in_wheel = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    in_sdist = tarfile.open(tmp_path / "dist" / sdist).getnames()
    for name in NAMES:
        assert f"selfalign/configs/{name}.yaml" in in_wheel
        assert any(n.endswith(f"src/selfalign/configs/{name}.yaml") for n in in_sdist)
