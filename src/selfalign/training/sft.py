"""The supervised fine-tuning recipe of stages 3 and 4 (paper sections 3.3 and 3.4) on TRL + PEFT.

Reads the checked SFT rows a stage hands over and a base model (local directory or hub id).
Writes the model files into `out_dir` (the metadata files are `selfalign.training.model_dir`'s):

    adapter/                         the LoRA adapter alone (+ tokenizer); the full model for `full`
    config.json, model.safetensors   the merged model (LoRA folded into the base)
    tokenizer files, chat_template.jinja, generation_config.json (EOS and padding set)
    training_log.jsonl               step, loss, learning_rate, tokens_per_second, epoch per log;
                                     step, eval_loss per evaluation (with eval_fraction > 0)
    logs/                            TensorBoard event files (report_to: tensorboard)
    checkpoints/                     while training (see `selfalign.training.checkpoints`)

`train` runs the steps top to bottom, each a function below it:
  1. data      each row -> a conversation with a seeded system prompt; the cut-off applied, counted;
               a seeded share held out for the eval loss (eval_fraction)
  2. schedule  gradient accumulation, steps and warm-up from the effective batch size
  3. model     the base (4-bit for qlora), seeded before the LoRA weights are drawn
  4. train     TRL's SFTTrainer, loss on the assistant tokens only (EOS included, so the model
               learns to stop), logging to report_to's trackers too; resumes from the last
               complete checkpoint of the same fingerprint; stats (steps, loss, log) are the whole run's, resumed or not
  5. save      adapter or full model, tokenizer and template, merge, generation config

Paper defaults: LoRA r=16, alpha=16 on q,k,v,o; learning rate 4e-4; effective batch 768; one
epoch; 100 warm-up steps; cut-off 512 tokens (768 for the final model of stage 4).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import math
import netrc
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from selfalign.errors import UserError
from selfalign.generation.base import row_seed
from selfalign.jsonl import JsonlAppender, read_jsonl, write_jsonl_atomic
from selfalign.text.constitution import Identity
from selfalign.text.conversation import (
    check_variants,
    install_chat_template,
    sft_messages,
    system_prompt,
)
from selfalign.training import checkpoints as ckpt

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINING_LOG = "training_log.jsonl"
# How the run is spread over processes, not what it trains: a finished model stays finished when
# they change (the effective batch is the same), though checkpoints resume only under the same.
LAUNCH_KEYS = ("processes", "distributed", "accelerate_config")
# How the run is watched, not what it trains: left out of every hash, as LAUNCH_KEYS are.
WATCH_KEYS = ("report_to", "eval_steps")
Reporter = Literal["none", "tensorboard", "wandb"]


class TrainConfig(BaseModel):
    """One supervised fine-tuning run (stage 3, and stage 4's final model)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Base model to fine-tune: local directory or hub id."
    )
    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="lora (paper), qlora (4-bit base; CUDA + bitsandbytes), or full fine-tune.",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        description="Module names that get LoRA adapters.",
    )
    learning_rate: float = Field(4e-4, gt=0, description="Peak learning rate.")
    effective_batch_size: int = Field(
        768, ge=1, description="Examples per optimizer step: micro batch x accumulation x devices."
    )
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass on one device.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data.")
    max_steps: int = Field(
        -1, description="If > 0, stop after this many optimizer steps (overrides epochs)."
    )
    warmup_steps: int = Field(
        100,
        ge=0,
        description="Linear warm-up steps; clamped to a tenth of the run when the run is shorter.",
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(
        512, ge=8, description="Cut-off: tokens per example (system prompt included)."
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Examples over the cut-off: truncate (paper; counted and reported) or drop them.",
    )
    system_prompts: list[str] = Field(
        default_factory=lambda: ["standard", "concise"],
        description="System prompts, one sampled per example (seeded by id): variant names "
        "(standard, concise), prompt files (.txt/.md) or texts; the first is the chat template's "
        "default.",
    )
    seed: int = Field(
        42, description="Seeds data order, dropout, LoRA init and system prompt choice."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 (or fp16) on CUDA, fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA if present, else CPU."
    )
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Training processes, one per GPU (auto: every visible GPU); more than 1 runs "
        "under accelerate launch (gloo on CPU).",
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="How several processes share the model: ddp (a copy each), fsdp (sharded; "
        "configs/accelerate/fsdp.yaml) or deepspeed (ZeRO-3; pip install 'selfalign[deepspeed]').",
    )
    accelerate_config: str | None = Field(
        None, description="Your own accelerate config file, instead of distributed's shipped one."
    )
    gradient_checkpointing: bool = Field(True, description="Trade compute for memory.")
    group_by_length: bool = Field(
        False, description="Batch examples of similar length (less padding)."
    )
    logging_steps: int = Field(10, ge=1, description="Log loss every N optimizer steps.")
    eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Hold out this share of the rows (chosen by seed and id) and log their loss "
        "as eval_loss; 0: no held-out split.",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Eval loss every N optimizer steps, and at the last (None: about ten times a "
        "run, never more often than logging_steps).",
    )
    report_to: Reporter | list[Reporter] = Field(
        "none",
        description="Also send the training logs to tensorboard (OUT/logs) or wandb (offline "
        "without an API key), or a list of both; none: training_log.jsonl only.",
    )
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk while training.")
    resume: bool = Field(
        True, description="Continue from the last checkpoint in out_dir/checkpoints."
    )
    keep_checkpoints: bool = Field(False, description="Keep checkpoints/ after a successful run.")
    merge: bool = Field(True, description="Write the LoRA-merged model next to the adapter.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint."
    )


class FinalTrainConfig(TrainConfig):
    """Stage 4's final SFT: the same recipe with the paper's longer cut-off for verbose answers.

    A subclass rather than a default instance, so a partial `train:` section in YAML keeps 768.
    """

    max_length: int = Field(
        768, ge=8, description="Cut-off: tokens per example (system prompt included)."
    )


# -- before training: what the run is ------------------------------------------------------------


def check_config(cfg: TrainConfig) -> str:
    """The base model to load (a local directory made absolute), after the checks that need no
    loading: a model is given, it is no adapter, qlora has CUDA and bitsandbytes."""
    from selfalign.modeling import adapter_base

    if not cfg.model:
        raise UserError(
            "no base model given: pass --model PATH_OR_HUB_ID (or model: in the config)"
        )
    check_variants(cfg.system_prompts)
    check_needs(cfg)
    local = Path(cfg.model).expanduser()
    # absolute, so the adapter's base path still resolves from any working directory
    name = str(local.resolve()) if local.exists() else cfg.model
    if adapter_base(name):
        raise UserError(f"model {name!r} is a LoRA adapter; fine-tune a full (merged) model")
    return name


def check_needs(cfg: TrainConfig, key: str = "") -> None:
    """The device and the optional packages the recipe needs are there (packages found without
    importing them); `selfalign run` calls this for every selected training stage before any
    work. `key`: the section's prefix in messages ("engrave.")."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError(
            f"{key}device: cuda: CUDA is not available on this machine (use cpu or auto)"
        )
    if cfg.method == "qlora" and (cfg.device == "cpu" or not cuda):
        raise UserError(f"{key}method qlora needs a CUDA GPU (none here); use method lora or full")
    for name in reporters(cfg):  # each is also the name of the package it needs
        if importlib.util.find_spec(name) is None:
            raise UserError(f"{key}report_to: {name} is not installed: pip install {name}")
    if cfg.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"{key}method qlora needs bitsandbytes: pip install 'selfalign[gpu]' (or bitsandbytes)"
        )


def reporters(cfg: TrainConfig) -> list[str]:
    """The trackers `report_to` names (none left out)."""
    names = [cfg.report_to] if isinstance(cfg.report_to, str) else cfg.report_to
    return [n for n in dict.fromkeys(names) if n != "none"]


def hashed_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings of `cfg` that the run's hashes cover: all but LAUNCH_KEYS and WATCH_KEYS, and
    eval_fraction only when set (so the hashes of runs made before it existed still hold)."""
    exclude = {*LAUNCH_KEYS, *WATCH_KEYS}
    if not cfg.eval_fraction:
        exclude.add("eval_fraction")
    return cfg.model_dump(exclude=exclude)


def fingerprint(cfg: TrainConfig, identity: Identity, sft_path: str | Path) -> str:
    """What a finished or checkpointed run was made from: config, identity, data bytes (every
    file of a saved `datasets` directory)."""
    digest = hashlib.sha256()
    bookkeeping = ("resume", "keep_checkpoints", "logging_steps", "save_total_limit")
    settings = {k: v for k, v in hashed_settings(cfg).items() if k not in bookkeeping}
    # 16 and 16.0 are one setting (a default int, a float read back from a file or job)
    settings = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                for k, v in settings.items()}  # fmt: skip
    systems = [system_prompt(identity, v) for v in cfg.system_prompts]  # prompt files' contents
    digest.update(json.dumps([settings, identity.model_dump(), systems], sort_keys=True).encode())
    path = Path(sft_path)
    try:
        if path.is_dir():  # a saved `datasets` dataset: its files, by name
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{file.relative_to(path)}\0".encode() + file.read_bytes())
        else:
            digest.update(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{sft_path}: file not found") from None
    return digest.hexdigest()[:16]


def main_process() -> bool:
    """False on the other ranks of a multi-GPU run: only rank 0 merges and writes metadata."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world == 1 or int(os.environ.get("RANK", "0")) == 0


# -- the recipe ----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    model_name: str,
    rows: list[dict[str, Any]],
    out_dir: Path,
    identity: Identity,
    run_fingerprint: str,
    callbacks: list | None = None,
    source: str | Path = "",
) -> dict[str, Any]:
    """Fine-tune `model_name` (from `check_config`) on `rows` into `out_dir`; return the stats.

    `run_fingerprint` (from `fingerprint`) guards checkpoint resume; `callbacks` are extra
    TrainerCallbacks; `source` names the data in warnings.
    """
    from transformers import set_seed

    from selfalign.modeling import load_tokenizer

    # 1. Data, rendered with the chat template the saved tokenizer will carry.
    tokenizer = load_tokenizer(model_name, cfg.trust_remote_code)
    install_chat_template(tokenizer, identity, system_prompt(identity, cfg.system_prompts[0]))
    conversations, held_out, counts = prepare_data(cfg, rows, tokenizer, identity, source)

    # 2. Schedule.
    plan = schedule(cfg, len(conversations))

    # 3. Model (+ LoRA adapter), seeded before the adapter weights are drawn.
    set_seed(cfg.seed)
    device, precision = device_and_precision(cfg)
    model = _load_for_training(cfg, model_name, device, precision)

    # 4. Train, from the last complete checkpoint of the same run if there is one.
    trainer = _trainer(cfg, model, tokenizer, (conversations, held_out), out_dir, plan, device,
                       precision, callbacks)  # fmt: skip
    progress = _train_steps(trainer, cfg, out_dir, run_fingerprint)
    stats = {
        "base_model": model_name,
        "method": cfg.method,
        **counts,
        "steps": progress.steps,
        "warmup_steps": plan.warmup,
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation": plan.accumulation,
        "world_size": plan.world,
        "distributed": cfg.distributed if plan.world > 1 else None,
        "effective_batch_size": cfg.micro_batch_size * plan.world * plan.accumulation,
        "precision": precision,
        "train_loss": run_loss(progress.log_history),
        **eval_stats(progress.log_history, counts),
        "resumed_from_step": ckpt.step_of(progress.resumed_from),
    }

    # 5. Save: every process (FSDP/DeepSpeed gather weights), then merge on the main one.
    if progress.final_files is None:
        _save_outputs(trainer, cfg, out_dir)
    elif main_process():
        _save_final_checkpoint(trainer, progress.final_files, cfg, out_dir)
    del trainer, model
    _free_memory()
    if main_process():
        if cfg.method != "full" and cfg.merge:
            _merge(model_name, out_dir / "adapter", out_dir, cfg.trust_remote_code)
        _write_generation_config(out_dir, tokenizer)
    return stats


# -- 1. data -------------------------------------------------------------------------------------


Conversations = list[list[dict[str, str]]]


def prepare_data(
    cfg: TrainConfig, rows: list[dict[str, Any]], tokenizer, identity: Identity, source
) -> tuple[Conversations, Conversations, dict[str, int]]:
    """The conversations to train on, those held out for the eval loss (`eval_fraction`; a system
    prompt sampled per row, seeded by its id), and the cut-off counts of the training rows (plus
    `eval_examples`); a UserError when the cut-off leaves nothing to learn or evaluate."""
    budget = prompt_budget(tokenizer, identity, cfg.system_prompts)
    if budget >= cfg.max_length:
        raise UserError(
            f"max_length {cfg.max_length} is shorter than the system prompt and turn headers "
            f"({budget} tokens); raise max_length"
        )
    rows, held_rows = split_eval(rows, cfg.eval_fraction, cfg.seed, source)
    conversations = [sft_messages(r, identity, cfg.system_prompts, cfg.seed) for r in rows]
    conversations, counts = fit_examples(conversations, tokenizer, cfg.max_length, cfg.overlong)
    _report_cutoff(counts, cfg, source)
    if not conversations:
        raise UserError(f"{source}: no example fits max_length {cfg.max_length}; raise it")
    held_out = [sft_messages(r, identity, cfg.system_prompts, cfg.seed) for r in held_rows]
    held_out, _ = fit_examples(held_out, tokenizer, cfg.max_length, cfg.overlong)
    if held_rows:
        if not held_out:
            raise UserError(f"{source}: no held-out example fits max_length {cfg.max_length}")
        counts["eval_examples"] = len(held_out)
    return conversations, held_out, counts


def split_eval(
    rows: list[dict[str, Any]], fraction: float, seed: int, source
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to train on, rows held out): the held-out share is `fraction` of the rows (at least
    one), those whose seeded hash of the id ranks lowest. So it depends on seed and ids, never on
    the order of the rows, and a larger fraction holds out the same rows and more."""
    if not fraction:
        return rows, []
    n = max(1, round(len(rows) * fraction))
    if n >= len(rows):
        raise UserError(
            f"{source}: eval_fraction {fraction} of {len(rows)} rows leaves none to train on; "
            "lower it (or set 0)"
        )
    held = {r["id"] for r in sorted(rows, key=lambda r: row_seed(seed, f"eval:{r['id']}"))[:n]}
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


def prompt_budget(tokenizer, identity: Identity, variants: list[str]) -> int:
    """Tokens the longest system prompt variant and the turn headers take before any text."""
    longest = 0
    for variant in variants:
        messages = [
            {"role": "system", "content": system_prompt(identity, variant)},
            {"role": "user", "content": ""},
        ]
        longest = max(longest, len(_tokens(tokenizer, messages, add_generation_prompt=True)))
    return longest


def _tokens(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_examples(
    conversations: list[list[dict[str, str]]], tokenizer, max_length: int, overlong: str
) -> tuple[list[list[dict[str, str]]], dict[str, int]]:
    """Apply the cut-off: count (and truncate or drop) examples over it; never silently.

    An example whose prompt alone fills the cut-off has no answer token left to learn from and is
    always dropped (TRL would drop it without telling).
    """
    counts = {"examples": len(conversations), "truncated": 0, "dropped_overlong": 0,
              "dropped_prompt_too_long": 0, "tokens": 0}  # fmt: skip
    kept = []
    for messages in conversations:
        first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = len(_tokens(tokenizer, messages[:first_answer], add_generation_prompt=True))
        total = len(_tokens(tokenizer, messages))
        if prompt >= max_length:
            counts["dropped_prompt_too_long"] += 1
            continue
        if total > max_length:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
        counts["tokens"] += min(total, max_length)
        kept.append(messages)
    counts["trained"] = len(kept)
    return kept, counts


def _report_cutoff(counts: dict[str, int], cfg: TrainConfig, source) -> None:
    if counts["truncated"]:
        log.warning(
            "%s: %d of %d examples exceed the cut-off of %d tokens and are truncated "
            "(their answers lose their ends); set overlong: drop to skip them instead",
            source, counts["truncated"], counts["examples"], cfg.max_length,
        )  # fmt: skip
    for key in ("dropped_overlong", "dropped_prompt_too_long"):
        if counts[key]:
            log.warning("%s: %d examples dropped (%s)", source, counts[key], key)


# -- 2. schedule ---------------------------------------------------------------------------------


class Schedule(NamedTuple):
    world: int  # processes (devices) training together
    accumulation: int  # micro batches per optimizer step
    steps: int  # optimizer steps of the whole run
    warmup: int  # warm-up steps


def schedule(cfg: TrainConfig, examples: int) -> Schedule:
    """Accumulation that reaches the effective batch (never more than one pass of micro batches),
    the steps, and a warm-up cut to a tenth of runs too short for the configured one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.micro_batch_size * world
    micro_batches = math.ceil(examples / per_step)
    accumulation = max(1, min(math.ceil(cfg.effective_batch_size / per_step), micro_batches))
    steps = (
        cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * micro_batches / accumulation)
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps <= steps // 2 else steps // 10
    return Schedule(world, accumulation, steps, warmup)


# -- 3. model ------------------------------------------------------------------------------------


def device_and_precision(cfg: TrainConfig) -> tuple[str, str]:
    """The device and precision `cfg` trains in (auto resolved), or a UserError if unavailable."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("device cuda: CUDA is not available on this machine (use cpu or auto)")
    device = "cuda" if cuda and cfg.device != "cpu" else "cpu"
    precision = cfg.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and device == "cpu":
        raise UserError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("precision bf16: this GPU does not support bfloat16; use fp16")
    return device, precision


def _load_for_training(cfg: TrainConfig, model_name: str, device: str, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half or torch.bfloat16,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif cfg.method == "lora" and half is not None:
        kwargs["dtype"] = half  # the frozen base in half precision; adapters train in fp32
    else:
        kwargs["dtype"] = torch.float32  # full fine-tune keeps fp32 master weights
    try:
        model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model {model_name!r}: cannot load it ({str(e).splitlines()[0]})"
        ) from None
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing)
    return model


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


# -- 4. train ------------------------------------------------------------------------------------


def _trainer(cfg, model, tokenizer, data: tuple[Conversations, Conversations], out_dir: Path,
             plan: Schedule, device, precision, callbacks):  # fmt: skip
    """TRL's SFTTrainer on conversational data (`data`: to train on, held out): the chat
    template's {% generation %} spans mark the assistant tokens the loss covers."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from selfalign.progress import enabled

    if not enabled():  # quiet mode: no bars for SFTTrainer's tokenization either
        import datasets

        datasets.disable_progress_bars()
    conversations, held_out = data
    report_to, trackers = _trackers(cfg, out_dir)
    args = _sft_args(cfg, out_dir / "checkpoints", plan, (device, precision), report_to,
                     evaluate=bool(held_out))  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": m} for m in conversations]),
        eval_dataset=Dataset.from_list([{"messages": m} for m in held_out]) if held_out else None,
        processing_class=tokenizer,
        peft_config=_lora_config(cfg) if cfg.method in ("lora", "qlora") else None,
        callbacks=[_jsonl_log(out_dir / TRAINING_LOG), *trackers, *(callbacks or [])],
    )
    if not enabled():  # quiet mode: the JSONL log has every step; no dicts on stdout
        trainer.remove_callback(PrinterCallback)
    _check_distributed(trainer, cfg)
    return trainer


def _check_distributed(trainer, cfg: TrainConfig) -> None:
    """Several processes share the model as `distributed` says, or the run stops: accelerate
    falls back to plain DDP without a word when its FSDP or DeepSpeed settings do not apply."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or cfg.distributed == "ddp":
        return
    enabled = trainer.is_fsdp_enabled if cfg.distributed == "fsdp" else trainer.is_deepspeed_enabled
    if not enabled:
        raise UserError(
            f"distributed: {cfg.distributed} was asked for, but accelerate did not enable it "
            f"(accelerate_config: {cfg.accelerate_config or 'the shipped one'}); check that file"
        )


def _sft_args(cfg: TrainConfig, checkpoints: Path, plan: Schedule, placement: tuple[str, str],
              report_to: list[str], evaluate: bool):  # fmt: skip
    from trl import SFTConfig

    from selfalign.progress import enabled

    device, precision = placement
    # the first step and, in short runs, the last one are always in the training log
    logging_steps = max(1, min(cfg.logging_steps, plan.steps))
    # transformers 5.2x renamed gradient_checkpointing (vLLM's CPU build pins transformers <5.20)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    return SFTConfig(
        output_dir=str(checkpoints),
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        assistant_only_loss=True,
        packing=False,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=plan.accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=plan.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        **{checkpointing: cfg.gradient_checkpointing},
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_first_step=True,
        logging_steps=logging_steps,
        **(_eval_args(cfg, plan, logging_steps) if evaluate else {}),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        report_to=report_to or "none",
        disable_tqdm=not enabled(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trained parameter gets a gradient every step
    )


def _eval_args(cfg: TrainConfig, plan: Schedule, logging_steps: int) -> dict[str, Any]:
    """The held-out loss every `eval_steps` (and at the last step: the Trainer does that), by default
    about ten times a run and never more often than the loss is logged."""
    return {
        "eval_strategy": "steps",
        "eval_steps": cfg.eval_steps or max(logging_steps, math.ceil(plan.steps / 10)),
        "per_device_eval_batch_size": cfg.micro_batch_size,
        "prediction_loss_only": True,  # the loss alone: no logits of the split kept in memory
    }


def _trackers(cfg: TrainConfig, out_dir: Path) -> tuple[list[str], list]:
    """`report_to` for the Trainer, and the tracker callbacks made here: TensorBoard's, to write
    into OUT/logs (the Trainer's own writes under checkpoints/, removed after the run)."""
    names = reporters(cfg)
    trackers = []
    if "tensorboard" in names:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(out_dir / "logs")
        trackers.append(tensorboard)
    if "wandb" in names and wandb_offline(os.environ):
        os.environ["WANDB_MODE"] = "offline"
        log.warning(
            "wandb: no API key here (WANDB_API_KEY or `wandb login`), so the run is logged "
            "offline into ./wandb; upload it later with `wandb sync`"
        )
    return [n for n in names if n != "tensorboard"], trackers


def wandb_offline(environ: Mapping[str, str]) -> bool:
    """True when nothing says how wandb should log (WANDB_MODE) and it has no API key to log
    online with (WANDB_API_KEY, or the netrc entry `wandb login` writes); the key is not read."""
    if environ.get("WANDB_MODE") or environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators("api.wandb.ai") is None
    except (OSError, netrc.NetrcParseError):
        return True


def _jsonl_log(path: Path):
    """A callback appending {step, loss, learning_rate, tokens_per_second, epoch} per log and
    {step, eval_loss} per evaluation (resume-safe: a row already in the file is not written twice).

    It also has the Trainer log every step it checkpoints, and the last: then the log history in
    a checkpoint covers every step before it, and `run_loss` of a resumed run is the whole run's.
    """
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        clock, tokens = 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            # runs after the Trainer's DefaultFlowCallback has decided what this step saves
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "eval_loss" in logs:
                _append_log(
                    path, {"step": state.global_step, "eval_loss": float(logs["eval_loss"])}
                )
            if "loss" not in logs:
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            rate = (tokens - self.tokens) / max(now - self.clock, 1e-9)
            self.clock, self.tokens = now, tokens
            record = {
                "step": state.global_step,
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "tokens_per_second": round(rate, 1),
                "epoch": round(float(state.epoch or 0), 4),
            }
            _append_log(path, record)

    return JsonlLog()


def _append_log(path: Path, record: dict[str, Any]) -> None:
    """Append a training or an eval row unless one of its kind has its step already (both kinds
    share steps: an evaluation follows the log of the step it ends)."""
    kind = "eval_loss" if "eval_loss" in record else "loss"
    with JsonlAppender(path, id_field="step") as out:
        out.ids = {r.get("step") for r in out.records if kind in r}
        out.write_batch([record])


class Progress(NamedTuple):
    resumed_from: Path | None  # the checkpoint training went on from
    steps: int  # optimizer steps of the whole run
    log_history: list[dict[str, Any]]  # the Trainer's logs of the whole run
    final_files: list[Path] | None  # the model files of a final checkpoint: nothing was trained


def _train_steps(trainer, cfg: TrainConfig, out_dir: Path, run_fingerprint: str) -> Progress:
    """Train from the last complete checkpoint of this run (or from the start).

    A run killed after its final checkpoint trains nothing more: given that checkpoint, the
    Trainer would run a step past max_steps whenever an epoch holds several steps.
    """
    checkpoints = out_dir / "checkpoints"
    layout = ckpt.layout_of(int(os.environ.get("WORLD_SIZE", "1")), cfg.distributed)
    resume = None
    if cfg.resume:
        resume = ckpt.resume_point(checkpoints, run_fingerprint, layout, move=main_process())
    if main_process():
        ckpt.write_fingerprint(checkpoints, run_fingerprint, layout)
    if main_process():
        _trim_log(out_dir / TRAINING_LOG, ckpt.step_of(resume))
    if resume is not None:
        state = ckpt.read_state(resume)
        files = ckpt.model_files(resume)
        if 0 < state.get("max_steps", 0) <= state["global_step"] and files is not None:
            log.warning("%s is the run's last step: writing the model from it", resume)
            return Progress(resume, state["global_step"], state.get("log_history", []), files)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return Progress(resume, trainer.state.global_step, trainer.state.log_history, None)


def _trim_log(path: Path, step: int) -> None:
    """Keep the training log's rows up to `step`, where training goes on: the steps a killed run
    took after its last checkpoint are taken, and logged, again (nothing at all on a fresh start)."""
    if not path.is_file():
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
    if len(kept) < len(rows):
        write_jsonl_atomic(path, kept)


def eval_stats(log_history: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    """{eval_loss: the last one logged} with a held-out split (its size is in `counts`)."""
    if "eval_examples" not in counts:
        return {}
    losses = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    return {"eval_loss": round(float(losses[-1]), 6) if losses else None}


def run_loss(log_history: list[dict[str, Any]]) -> float:
    """The mean training loss over every step of the run, from the Trainer's log history.

    Each logged loss is the mean since the log before it, so it weighs that many steps. The
    history of a resumed run holds the logs before its checkpoint too, whereas the Trainer's own
    train_loss covers only the steps of the last `train()` call.
    """
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) > last:
            total += float(entry["loss"]) * (entry["step"] - last)
            last = entry["step"]
    return round(total / max(last, 1), 6)


# -- 5. save -------------------------------------------------------------------------------------


def _save_outputs(trainer, cfg: TrainConfig, out_dir: Path) -> None:
    """The adapter (LoRA) or the full model, each with the tokenizer and its chat template.

    Called on every process: under FSDP/DeepSpeed saving gathers weights from all of them.
    """
    target = out_dir if cfg.method == "full" else out_dir / "adapter"
    if trainer.is_fsdp_enabled:  # checkpoints are sharded; the model is gathered whole on rank 0
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(out_dir))
        (target / "training_args.bin").unlink(
            missing_ok=True
        )  # a pickle; the YAML config says it all


def _save_final_checkpoint(trainer, files: list[Path], cfg: TrainConfig, out_dir: Path) -> None:
    """What `_save_outputs` writes, from the final checkpoint: the Trainer wrote the model there
    with the same `save_model` at the last step, so these are the trained weights, byte for byte."""
    target = out_dir if cfg.method == "full" else out_dir / "adapter"
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    trainer.processing_class.save_pretrained(str(out_dir))


def _merge(model_name: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool) -> None:
    """Fold the adapter into a fresh copy of the base (its own dtype, on CPU) and save it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        model_name, dtype="auto", trust_remote_code=trust_remote_code, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    del base, merged
    gc.collect()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_generation_config(out_dir: Path, tokenizer) -> None:
    """EOS, padding and BOS of the tokenizer in generation_config.json, so `generate` and vLLM
    stop where training taught the model to (only where a full model was written)."""
    from transformers import GenerationConfig

    if not (out_dir / "config.json").is_file():
        return
    try:
        gen = GenerationConfig.from_pretrained(str(out_dir))
    except OSError:
        gen = GenerationConfig()
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(str(out_dir))
