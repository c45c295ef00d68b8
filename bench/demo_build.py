"""Demo model build: the build before issue 17 against today's, in one invocation.

    .venv/bin/python bench/demo_build.py              # both builds, then stages 1-4 on each
    .venv/bin/python bench/demo_build.py --no-run     # build times only

"Before" is `src/selfalign/demo.py` as it was at `BEFORE` (read from git, run against today's
package: its corpus and prompt builders are unchanged); "after" is the working tree's. Each
build runs in a fresh subprocess with the same torch threads (`--threads`, default: torch's own,
as `make demo` runs it), one after the other; wall and CPU seconds are both reported. Then
`selfalign run` on the bundled demo config, stages 1-4, on each model with each `--seeds` run
seed, and the kept counts from the manifests: whether the faster model's completions still parse
and pass the filters. Two models, two builds and the runs go to a temporary folder (`--keep DIR`:
there, kept). Prints a markdown section and appends it to bench/RESULTS.md (`--no-record`: not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
BEFORE = "37b8fcd"  # main before the faster build (demo.py as it had been since 35cc136)
CONFIG = REPO / "src" / "selfalign" / "configs" / "demo.yaml"
# (row label, stage, keys into its manifest counts, kept key, out-of key)
KEPT = [
    ("self-instruct kept / generated", "instructions", ("steps", "self_instruct"), "kept", "generated"),
    ("topics kept", "instructions", ("steps", "topics"), "kept", None),
    ("TGRT questions kept / generated", "instructions", ("steps", "questions"), "kept", "generated"),
    ("instructions after merge", "instructions", (), "kept", None),
    ("self-align kept / generated", "self_align", (), "kept", "generated"),
    ("verbose kept / generated", "verbose", (), "kept", "generated"),
]  # fmt: skip


def child(which: str, out: Path, threads: int) -> None:
    """In a fresh process: one build; prints its wall and CPU seconds and its log as JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if which == "before":
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:src/selfalign/demo.py"],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        module: dict = {"__name__": "demo_before"}
        exec(compile(source, "demo_before.py", "exec"), module)
        build = module["build_demo_model"]
    else:
        from selfalign.demo import build_demo_model as build
    lines: list[str] = []
    wall, cpu = time.perf_counter(), time.process_time()
    build(out, log=lines.append)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"wall": wall, "cpu": cpu, "log": lines}))


def build(which: str, out: Path, threads: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", which, str(out), str(threads)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode:
        sys.exit(f"{which} build failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pipeline(model: Path, run_dir: Path, seed: int) -> dict:
    """`selfalign run` stages 1-4 on `model` with run seed `seed`: the manifest's stages."""
    done = subprocess.run(
        [sys.executable, "-m", "selfalign", "run", str(CONFIG), f"model.model={model}",
         f"seed={seed}", "--run-dir", str(run_dir), "--stages", "1-4", "--quiet"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"selfalign run on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def kept(stages: dict, stage: str, path: tuple[str, ...], key: str, of: str | None) -> str:
    counts = stages[stage]["counts"]
    for part in path:
        counts = counts[part]
    return f"{counts[key]}" + (f" / {counts[of]}" if of else "")


def table(builds: dict[str, dict], runs: dict[str, list[dict]], seeds: list[int]) -> str:
    old, new = builds["before"], builds["after"]
    lines = ["| | before | after | ratio |", "|---|---|---|---|"]
    for label, key in (("build, wall s", "wall"), ("build, CPU s", "cpu")):
        lines.append(f"| {label} | {old[key]:.0f} | {new[key]:.0f} | "
                     f"**{old[key] / new[key]:.2f}x** |")  # fmt: skip
    steps = [next((m[1] for line in b["log"] if (m := re.search(r"step \d+/(\d+)", line))), "?")
             for b in (old, new)]  # fmt: skip
    lines.append(f"| optimizer steps | {steps[0]} | {steps[1]} | |")
    last = [next((line.partition("loss by kind ")[2] for line in reversed(b["log"])
                  if "loss by kind" in line), "?") for b in (old, new)]  # fmt: skip
    lines.append(f"| last logged loss by kind | {last[0]} | {last[1]} | |")
    for label, *spec in KEPT if runs else []:
        cells = [", ".join(kept(stages, *spec) for stages in runs[which]) for which in builds]
        lines.append(
            f"| {label} (run seeds {', '.join(map(str, seeds))}) | {cells[0]} | {cells[1]} | |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--no-run", action="store_true", help="time the builds only")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads in both builds (0: default)"
    )
    p.add_argument("--seeds", default="42,43", help="run seeds of the demo pipeline on each model")
    p.add_argument("--keep", type=Path, help="build and run under this folder, and keep it")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), int(args.child[2]))
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        builds = {}
        for which in ("before", "after"):
            builds[which] = build(which, root / f"{which}-model", args.threads)
            print(f"{which}: {builds[which]['wall']:.0f}s wall, {builds[which]['cpu']:.0f}s CPU",
                  flush=True)  # fmt: skip
        runs = {} if args.no_run else {
            which: [pipeline(root / f"{which}-model", root / f"{which}-run-{s}", s) for s in seeds]
            for which in builds
        }  # fmt: skip
    import torch
    import transformers

    section = (
        f"\n## Demo model build, {date.today()} (cpu)\n\n"
        f"`python bench/demo_build.py --threads {args.threads}`: before = `selfalign/demo.py` at "
        f"{BEFORE}, after = this tree; build seed 0, each build in its own process, one after "
        f"the other; then stages 1-4 of the bundled demo config on each model. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}.\n\n"
        + table(builds, runs, seeds)
    )
    print(section)
    if not args.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
