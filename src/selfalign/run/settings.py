"""The pipeline config, and what is checked and hashed before `selfalign run` does any work.

`PipelineConfig` has one section per stage of the registry. `load_pipeline_config` builds it
(YAML < `dotted.key=value` overrides < `--run-dir`) and runs the preflight: model, input files,
the backend's capabilities against what each stage asks, every generating stage's longest
prompt plus its max_tokens within the model's context (`selfalign.stages.context_fit`), a
writable run directory. `stage_configs`/`stage_hashes` give each stage the settings
its outputs depend on (files they name included, by content) and a hash chained in pipeline
order; `parse_stages` and `check_force` read `--stages` and `--force`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from selfalign.errors import UserError
from selfalign.generation import BackendConfig
from selfalign.run.manifest import config_hash
from selfalign.run.registry import STAGE, STAGES, names
from selfalign.stages.stage2_self_align import stage_constitution

# model settings that change what is generated (batch size, device and concurrency do not)
MODEL_KEYS = (
    "model", "tokenizer", "backend", "dtype", "base_url", "trust_remote_code", "extra_body"
)  # fmt: skip


class _PipelineBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/selfalign", description="Run directory (--run-dir overrides).")
    seed: int = Field(42, description="Default seed of every stage that does not set its own.")
    constitution: str = Field(
        "default", description="Constitution: a bundled name or a YAML/prompt-text file."
    )
    model: BackendConfig = Field(..., description="The base model and how it generates.")


# one section per stage of the registry, named after the stage
PipelineConfig = create_model(
    "PipelineConfig",
    __base__=_PipelineBase,
    __doc__="Everything `selfalign run` needs; one section per stage.",
    **{
        s.name: (s.config, Field(default_factory=s.config, description=s.description))
        for s in STAGES
    },
)


def shared_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The top-level seed and constitution fill the stage sections that leave them unset."""
    seed = data.get("seed", 42)
    for stage in STAGES:
        for path in stage.seeded:
            section = _section(data, (stage.name, *path))
            if section is not None:
                section.setdefault("seed", seed)
    self_align = _section(data, ("self_align",))
    if self_align is not None:
        self_align.setdefault("constitution", data.get("constitution", "default"))
    return data


def _section(data: dict, path: tuple[str, ...]) -> dict | None:
    """The nested dict at `path`, created when missing; None if something on the way is not one."""
    node = data
    for key in path:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return None
        node = child
    return node


# -- config ---------------------------------------------------------------------------------------


def load_pipeline_config(
    path: str | Path, overrides: Iterable[str] = (), run_dir: str | Path | None = None
) -> PipelineConfig:
    """Read, override, validate and pre-flight a pipeline config; any problem is one UserError."""
    from selfalign.config import build_config

    flags = {"run_dir": str(run_dir) if run_dir is not None else None}
    cfg = build_config(PipelineConfig, path, overrides, flags, prepare=shared_defaults)
    preflight(cfg, str(path))
    return cfg


def preflight(cfg: PipelineConfig, source: str) -> None:
    """Check what can be checked before any work: model, constitution, input files, backend,
    the prompts' fit in the context, run dir."""
    from selfalign.modeling import _check_exists

    if cfg.model.backend != "openai" or cfg.model.serve == "auto":  # loaded from here
        _check_exists(cfg.model.model)
    if cfg.model.backend == "vllm" or cfg.model.serve == "auto":
        _check_vllm()
    stage_constitution(cfg.self_align)
    stage1 = cfg.instructions
    for key, value in (
        ("instructions.self_instruct.seed_tasks", stage1.self_instruct.seed_tasks),
        ("instructions.self_instruct.meta_prompt", stage1.self_instruct.meta_prompt),
        ("instructions.topics.seed_questions", stage1.topics.seed_questions),
        ("instructions.topics.prompt", stage1.topics.prompt),
        ("instructions.questions.seed_questions", stage1.questions.seed_questions),
        ("instructions.questions.prompt", stage1.questions.prompt),
    ):
        if value is not None and not Path(value).is_file():
            raise UserError(f"{source}: {key}: no such file {value!r}")
    _check_stage1_inputs(stage1)
    _check_backend(cfg)
    _check_prompts_fit(cfg)
    _check_writable(Path(cfg.run_dir))


def check_needs(cfg: PipelineConfig, stages: Iterable[str]) -> None:
    """What the stages about to run need beyond the config: the GPU they are told to use, and
    optional packages (trackers, bitsandbytes, lm-evaluation-harness). Checked before the first
    of them starts rather than hours later, and only for the stages selected."""
    from selfalign.training.sft import check_needs as check_training

    stages = list(stages)
    generating = {"instructions", "self_align", "verbose", "evaluate"}
    if cfg.model.backend == "transformers" and generating.intersection(stages):
        from selfalign.modeling import resolve_device

        resolve_device(cfg.model.device, "model.device:")
    for name in stages:
        if name == "engrave":
            check_training(cfg.engrave, "engrave.")
        elif name == "verbose":
            check_training(cfg.verbose.train, "verbose.train.")
        elif name == "evaluate" and cfg.evaluate.tasks:
            from selfalign.evaluation.harness import require_lm_eval

            require_lm_eval()


def _check_vllm() -> None:
    """vLLM is importable (found without importing it: that takes seconds)."""
    import importlib.util

    from selfalign.generation.vllm_backend import INSTALL_HINT

    if importlib.util.find_spec("vllm") is None:
        raise UserError(INSTALL_HINT)


def _check_stage1_inputs(cfg) -> None:
    """Stage 1's seed files and prompts parse (an empty seed file fails now, not after the model
    has loaded); the topics file is stage 1's own output, so it is not checked here."""
    from selfalign.stages.stage1_instructions import (
        load_seed_questions,
        read_text_input,
        render_template,
        self_instruct_inputs,
        topics_inputs,
    )

    self_instruct_inputs(cfg.self_instruct)
    topics_inputs(cfg.topics)
    load_seed_questions(cfg.questions.seed_questions)
    template = read_text_input(cfg.questions.prompt, "question_prompt.txt")
    render_template(template, "", "", source=cfg.questions.prompt or "question prompt")


def _check_prompts_fit(cfg: PipelineConfig) -> None:
    """Every generating stage's longest prompt plus its max_tokens fits the base model's context
    (counted with its tokenizer when the model is a local directory), so a too-short context
    fails now rather than after the stages before it ran. Stage 2's instructions and stage 4's
    questions are not known yet: room for one is kept (`selfalign.stages.context_fit`)."""
    from selfalign.modeling import configured_context, load_tokenizer
    from selfalign.stages.context_fit import (
        Limits,
        check_self_align_fit,
        check_stage1_fit,
        check_verbose_fit,
    )

    model = cfg.model.tokenizer or cfg.model.model
    context = cfg.model.context or configured_context(cfg.model.model)
    if context is None or not Path(model).expanduser().is_dir():
        return
    limits = Limits(load_tokenizer(model, cfg.model.trust_remote_code), context, cfg.model.model)
    stage1 = cfg.instructions
    for step in (stage1.self_instruct, stage1.topics, stage1.questions):
        check_stage1_fit(step, limits)
    constitution = stage_constitution(cfg.self_align)
    check_self_align_fit(cfg.self_align, limits, constitution)
    # the engraved model has the base model's context, and the chat template stage 3 installs
    check_verbose_fit(cfg.verbose, limits, constitution.identity)


def _check_backend(cfg: PipelineConfig) -> None:
    """Every generating stage can do what its settings ask of the backend (tokenizer, logit bias,
    n-gram orders), checked without loading the model."""
    from selfalign.generation import capabilities
    from selfalign.stages import stage1_instructions, stage2_self_align, stage4_verbose

    caps = capabilities(cfg.model)
    stage1_instructions.check_backend(cfg.instructions, caps)
    stage2_self_align.check_backend(cfg.self_align, caps)
    # stage 4 renders its prompts with the engraved model's own tokenizer (registry._verbose)
    stage4_verbose.check_backend(cfg.verbose, caps, tokenizer_given=True)


def _check_writable(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        # a name of its own: two runs started together on one directory must not remove each
        # other's probe (the loser is then refused by the lock, naming the winner)
        tempfile.TemporaryFile(dir=run).close()
    except OSError as e:
        raise UserError(f"run directory {str(run)!r} is not writable ({e.strerror})") from None


def stage_configs(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per stage, in pipeline order, the settings its outputs depend on (hashed for change
    detection); an edit of the constitution file counts as a change of stage 2."""
    model = cfg.model.model_dump(include=set(MODEL_KEYS))
    if not model["extra_body"]:  # unset: the hashes of runs made before the key existed hold
        del model["extra_body"]
    constitution = stage_constitution(cfg.self_align).model_dump()
    upstream = {
        "instructions": {"model": model},
        "self_align": {"model": model, "constitution_content": config_hash(constitution)},
        "engrave": {"model": model["model"]},
    }
    settings = {s.name: {**upstream.get(s.name, {}), **_hashed(cfg, s.name)} for s in STAGES}
    settings = _with_file_contents(settings)
    # as JSON sees them (string keys), so they compare equal to what the manifest stored
    return {
        name: json.loads(json.dumps(v, sort_keys=True, default=str)) for name, v in settings.items()
    }


def _hashed(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """A stage's own settings, less how its training is spread over processes and watched: a
    finished model stays finished when only that changes (checkpoints check it for themselves)."""
    from selfalign.training.sft import hashed_settings

    section = getattr(cfg, name)
    if name == "engrave":
        return hashed_settings(section)
    if name == "verbose":
        return {**section.model_dump(exclude={"train"}), "train": hashed_settings(section.train)}
    return section.model_dump()


def _with_file_contents(value: Any) -> Any:
    """Settings with every file they name followed by a hash of its content, so an edited prompt
    or seed file counts as a changed setting (same path, different text)."""
    if isinstance(value, dict):
        return {k: _with_file_contents(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_file_contents(v) for v in value]
    if isinstance(value, str) and "\n" not in value and len(value) < 4096:
        path = Path(value)
        try:
            if path.is_file():
                return f"{value} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})"
        except OSError:
            pass
    return value


def stage_hashes(
    cfg: PipelineConfig, settings: dict[str, dict[str, Any]] | None = None
) -> dict[str, str]:
    """Each stage's hash chains on the one before it, in pipeline order (`settings`: what
    `stage_configs(cfg)` returned, when the caller has it already)."""
    hashes, upstream = {}, ""
    for stage, own in (settings or stage_configs(cfg)).items():
        upstream = hashes[stage] = config_hash({"upstream": upstream, "settings": own})
    return hashes


def parse_stages(text: str | None) -> list[str]:
    """`None` = all; `2`, `self_align`, `1-2`, `2-`, `instructions-engrave` select a range."""
    stages = names()
    if not text:
        return stages

    def index(part: str, default: int) -> int:
        part = part.strip()
        if not part:
            return default
        if part.isdigit() and 1 <= int(part) <= len(stages):
            return int(part) - 1
        if part in stages:
            return stages.index(part)
        raise UserError(
            f"--stages {text!r}: {part!r} is not a stage; use 1-{len(stages)} or {', '.join(stages)}"
        )

    # names use underscores, so after this a dash can only separate the two ends of a range
    first, sep, last = text.replace("self-align", "self_align").partition("-")
    lo = index(first, 0)
    hi = index(last, len(stages) - 1) if sep else lo
    if lo > hi:
        raise UserError(f"--stages {text!r}: the range runs backwards")
    return stages[lo : hi + 1]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def check_force(force: set[str], selected: list[str]) -> set[str]:
    """--force names selected stages only: forcing one that does not run would delete and redo
    nothing (or delete work it cannot redo)."""
    for name in sorted(force, key=lambda n: names().index(n) if n in names() else -1):
        if name not in names():
            raise UserError(f"--force {name!r}: not a stage; use {', '.join(names())}")
        if name not in selected:
            raise UserError(
                f"--force {name}: stage {name!r} is not among the stages to run "
                f"({', '.join(selected)}); add it to --stages, e.g. --stages {STAGE[name].number}-"
            )
    return force


def changed_message(stage: str, entry: dict[str, Any], settings: dict[str, Any]) -> str:
    changed = [
        k if k.startswith(("model", "constitution")) else f"{stage}.{k}"
        for k in changed_keys(entry.get("settings", {}), settings)
    ]
    what = ", ".join(changed[:5]) or "an earlier stage's settings"
    return (
        f"stage {stage!r} already ran ({entry['status']}) with different settings ({what}); "
        f"rerun with --force {stage} to redo it and the stages after it"
    )
