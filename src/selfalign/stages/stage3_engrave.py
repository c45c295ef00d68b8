"""Stage 3, principle engraving (paper section 3.3), and the SFT recipe stage 4 reuses.

Reads an SFT file (`sft.jsonl` from stage 2: `{id, instruction, input, output, ...}` per line, or
`{id, messages}`) and fine-tunes a base model on it WITHOUT the constitution in the prompt: each
example is a short system prompt (see `selfalign.text.conversation`), the user turn and the answer.
The loss covers the assistant tokens only, EOS included, so the model learns to stop.

Writes into `out_dir` (a model directory that transformers and `vllm serve` load as is):

    config.json, model.safetensors   the merged model (LoRA merged into the base; or the full model)
    tokenizer files, chat_template.jinja
    generation_config.json           EOS and padding set
    README.md                        model card: base model, data counts, constitution, settings, command
    adapter/                         the LoRA adapter alone (+ tokenizer), loadable as base + adapter
    training_log.jsonl               step, loss, learning_rate, tokens_per_second
    train_config.yaml, train_stats.json
    checkpoints/                     while training (kept only with keep_checkpoints)

Paper defaults: LoRA r=16, alpha=16 on q,k,v,o; learning rate 4e-4; effective batch 768; one
epoch; 100 warm-up steps; cut-off 512 tokens (768 for the final model of stage 4).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfalign import __version__
from selfalign.config import dump_config
from selfalign.errors import UserError
from selfalign.jsonl import JsonlAppender, read_records, write_text_atomic
from selfalign.text.constitution import Identity
from selfalign.text.conversation import (
    check_sft_row,
    check_variants,
    install_chat_template,
    sft_messages,
    system_prompt,
)

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ENGRAVE_DATA = "answers the base model wrote under a constitution of principles"


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
    gradient_checkpointing: bool = Field(True, description="Trade compute for memory.")
    group_by_length: bool = Field(
        False, description="Batch examples of similar length (less padding)."
    )
    logging_steps: int = Field(10, ge=1, description="Log loss every N optimizer steps.")
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


# -- data ------------------------------------------------------------------------------------------


def load_sft_rows(path: str | Path) -> list[dict[str, Any]]:
    """The SFT records of `path` (JSONL, or a JSON array such as the original ShareGPT identity
    data), each checked; a bad one is a UserError naming file and record."""
    rows = read_records(path)
    if not rows:
        raise UserError(f"{path}: no records to train on (the file is empty)")
    seen: set[Any] = set()
    for n, row in enumerate(rows, start=1):
        check_sft_row(row, f"{path}: record {n}")
        if row["id"] in seen:
            raise UserError(f"{path}: record {n}: duplicate id {row['id']!r}")
        seen.add(row["id"])
    return rows


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


# -- the recipe ----------------------------------------------------------------------------------


def run_engrave(
    cfg: TrainConfig,
    sft_path: str | Path,
    out_dir: str | Path,
    identity: Identity,
    constitution: str | None = None,
    command: str | None = None,
    callbacks: list | None = None,
    data_description: str = ENGRAVE_DATA,
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `sft_path` into the model directory `out_dir`; return stats.

    `constitution` names the constitution behind the data (for the model card); `command` is the
    command line to print as the way to reproduce; `callbacks` are extra TrainerCallbacks;
    `data_description` says in the card what the answers are.
    A rerun resumes from the last checkpoint; a finished run with the same config and data is
    not redone.
    """
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from selfalign.modeling import adapter_base, load_tokenizer
    from selfalign.progress import enabled

    out_dir = Path(out_dir)
    model_name = _check_config(cfg)
    check_variants(cfg.system_prompts)
    fingerprint = _fingerprint(cfg, identity, sft_path)
    done = _finished(out_dir, fingerprint)
    if done is not None:
        return done
    if adapter_base(model_name):
        raise UserError(f"model {model_name!r} is a LoRA adapter; fine-tune a full (merged) model")
    started = time.perf_counter()
    if not enabled():
        import datasets

        datasets.disable_progress_bars()

    # 1. Data: rows -> conversations with a seeded system prompt, cut to the cut-off (counted).
    rows = load_sft_rows(sft_path)
    tokenizer = load_tokenizer(model_name, cfg.trust_remote_code)
    install_chat_template(tokenizer, identity, system_prompt(identity, cfg.system_prompts[0]))
    budget = prompt_budget(tokenizer, identity, cfg.system_prompts)
    if budget >= cfg.max_length:
        raise UserError(
            f"max_length {cfg.max_length} is shorter than the system prompt and turn headers "
            f"({budget} tokens); raise max_length"
        )
    conversations = [sft_messages(r, identity, cfg.system_prompts, cfg.seed) for r in rows]
    conversations, counts = fit_examples(conversations, tokenizer, cfg.max_length, cfg.overlong)
    _report_cutoff(counts, cfg, sft_path)
    if not conversations:
        raise UserError(f"{sft_path}: no example fits max_length {cfg.max_length}; raise it")
    dataset = Dataset.from_list([{"messages": m} for m in conversations])

    # 2. Batch shape and schedule from the effective batch size.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.micro_batch_size * world
    micro_batches = math.ceil(len(conversations) / per_step)
    accumulation = max(1, min(math.ceil(cfg.effective_batch_size / per_step), micro_batches))
    steps = (
        cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * micro_batches / accumulation)
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps <= steps // 2 else steps // 10

    # 3. Model (+ LoRA adapter), seeded before the adapter weights are drawn.
    set_seed(cfg.seed)
    device, precision = _device_and_precision(cfg)
    model = _load_for_training(cfg, model_name, device, precision)
    peft_config = _lora_config(cfg) if cfg.method in ("lora", "qlora") else None

    # 4. Train with TRL: conversational data, loss on the assistant spans ({% generation %}).
    checkpoints = out_dir / "checkpoints"
    args = _sft_args(cfg, checkpoints, accumulation, warmup, steps, device, precision)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_jsonl_log(out_dir / "training_log.jsonl"), *(callbacks or [])],
    )
    if not enabled():  # quiet mode: the JSONL log has every step; no dicts on stdout
        trainer.remove_callback(PrinterCallback)
    resume_from = _last_checkpoint(checkpoints, fingerprint) if cfg.resume else None
    _write_fingerprint(checkpoints, fingerprint)
    result = trainer.train(resume_from_checkpoint=resume_from)

    # 5. Outputs: adapter, merged model, tokenizer + template, generation config, model card.
    stats = {
        "base_model": model_name,
        "method": cfg.method,
        **counts,
        "steps": trainer.state.global_step,
        "warmup_steps": warmup,
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation": accumulation,
        "world_size": world,
        "effective_batch_size": per_step * accumulation,
        "precision": precision,
        "train_loss": round(float(result.training_loss), 6),
        "resumed_from_step": _step_of(resume_from),
        "identity": identity.model_dump(),
        "constitution": constitution or "default",
        "data_description": data_description,
        "fingerprint": fingerprint,
        "versions": _versions(),
    }
    _save_outputs(trainer, cfg, out_dir)
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        return stats
    if cfg.method != "full" and cfg.merge:
        _merge(model_name, out_dir / "adapter", out_dir, cfg.trust_remote_code)
    stats["seconds"] = round(time.perf_counter() - started, 1)
    _finish_model_dir(out_dir, tokenizer, cfg, stats, sft_path, command)
    if not cfg.keep_checkpoints:
        _remove_tree(checkpoints)
    return stats


# -- recipe pieces -------------------------------------------------------------------------------


def _check_config(cfg: TrainConfig) -> str:
    """Fail early, in one line, on settings this machine cannot run; return the model path."""
    if not cfg.model:
        raise UserError(
            "no base model given: pass --model PATH_OR_HUB_ID (or model: in the config)"
        )
    if cfg.method == "qlora":
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise UserError("method qlora needs a CUDA GPU (none here); use method lora or full")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("method qlora needs bitsandbytes: pip install bitsandbytes") from None
    local = Path(cfg.model).expanduser()
    # absolute, so the adapter's base path still resolves from any working directory
    return str(local.resolve()) if local.exists() else cfg.model


def _device_and_precision(cfg: TrainConfig) -> tuple[str, str]:
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


def _sft_args(
    cfg: TrainConfig,
    checkpoints: Path,
    accumulation: int,
    warmup: int,
    steps: int,
    device,
    precision,
):
    from trl import SFTConfig

    from selfalign.progress import enabled

    return SFTConfig(
        output_dir=str(checkpoints),
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        assistant_only_loss=True,
        packing=False,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        activation_checkpointing=cfg.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        # the first step and, in short runs, the last one are always in the training log
        logging_first_step=True,
        logging_steps=max(1, min(cfg.logging_steps, steps)),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=not enabled(),
        dataloader_num_workers=0,
    )


def _jsonl_log(path: Path):
    """A callback appending {step, loss, learning_rate, tokens_per_second} per log (resume-safe:
    a step already in the file is not written twice)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        clock, tokens = 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
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
            with JsonlAppender(path, id_field="step") as out:
                out.write_batch([record])

    return JsonlLog()


def _fingerprint(cfg: TrainConfig, identity: Identity, sft_path: str | Path) -> str:
    """What a finished or checkpointed run was made from: config, identity, data bytes."""
    digest = hashlib.sha256()
    settings = cfg.model_dump(
        exclude={"resume", "keep_checkpoints", "logging_steps", "save_total_limit"}
    )
    systems = [system_prompt(identity, v) for v in cfg.system_prompts]  # prompt files' contents
    digest.update(json.dumps([settings, identity.model_dump(), systems], sort_keys=True).encode())
    try:
        digest.update(Path(sft_path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"{sft_path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{sft_path}: is a directory, expected a JSONL file") from None
    return digest.hexdigest()[:16]


def _finished(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    stats_path = out_dir / "train_stats.json"
    if not stats_path.is_file():
        return None
    stats = json.loads(stats_path.read_text())
    if stats.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out_dir} already holds a model trained from other settings or data; "
            "choose another output directory or delete it"
        )
    log.warning("%s: already trained with these settings; nothing to do", out_dir)
    return {**stats, "skipped": True}


def _last_checkpoint(checkpoints: Path, fingerprint: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints.is_dir():
        return None
    last = get_last_checkpoint(str(checkpoints))
    if last is None:
        return None
    saved = checkpoints / "selfalign_fingerprint.txt"
    if saved.is_file() and saved.read_text().strip() != fingerprint:
        raise UserError(
            f"{checkpoints} holds checkpoints of a run with other settings or data; "
            "delete that folder or set resume: false"
        )
    log.warning("resuming from %s", last)
    return last


def _write_fingerprint(checkpoints: Path, fingerprint: str) -> None:
    write_text_atomic(checkpoints / "selfalign_fingerprint.txt", fingerprint + "\n")


def _step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0


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


def _save_outputs(trainer, cfg: TrainConfig, out_dir: Path) -> None:
    """The adapter (LoRA) or the full model, each with the tokenizer and its chat template.

    Called on every process: under FSDP/DeepSpeed saving gathers weights from all of them.
    """
    target = out_dir if cfg.method == "full" else out_dir / "adapter"
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(out_dir))
        (target / "training_args.bin").unlink(
            missing_ok=True
        )  # a pickle; the YAML config says it all


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


def _finish_model_dir(out_dir: Path, tokenizer, cfg: TrainConfig, stats, sft_path, command) -> None:
    """generation_config.json with EOS, config, card and stats (written last: it marks done)."""
    from transformers import GenerationConfig

    if (out_dir / "config.json").is_file():
        try:
            gen = GenerationConfig.from_pretrained(str(out_dir))
        except OSError:
            gen = GenerationConfig()
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
        gen.save_pretrained(str(out_dir))
    write_text_atomic(out_dir / "train_config.yaml", dump_config(cfg))
    command = command or _reproduce_command(cfg, sft_path, out_dir, stats)
    card = model_card(cfg, stats, sft_path, command)
    write_text_atomic(out_dir / "README.md", card)
    if (out_dir / "adapter").is_dir():  # replaces PEFT's empty template card
        write_text_atomic(out_dir / "adapter" / "README.md", card)
    write_text_atomic(out_dir / "train_stats.json", json.dumps(stats, indent=2) + "\n")


def _reproduce_command(cfg: TrainConfig, sft_path, out_dir: Path, stats) -> str:
    identity = stats["identity"]
    parts = [
        "selfalign", "engrave",
        "--config", str(out_dir / "train_config.yaml"),
        "--data", str(sft_path),
        "--out", str(out_dir),
        "--name", identity["name"],
        "--developer", identity["developer"],
        "--knowledge-cutoff", identity["knowledge_cutoff"],
    ]  # fmt: skip
    return shlex.join(parts)


def model_card(cfg: TrainConfig, stats: dict[str, Any], sft_path, command: str) -> str:
    """README.md of the model directory: what it is, what made it, how to remake it."""
    identity = stats["identity"]
    tags = ["selfalign", "self-align", "sft", cfg.method]
    hyper = dump_config(cfg).strip()
    data_rows = "\n".join(
        f"| {key} | {stats[key]} |"
        for key in (
            "examples",
            "trained",
            "truncated",
            "dropped_overlong",
            "dropped_prompt_too_long",
            "tokens",
        )
    )
    usage = (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(PATH)\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], '
        'add_generation_prompt=True, return_tensors="pt")\n'
        "print(tok.decode(model.generate(**ids, max_new_tokens=200)[0]))\n"
        "```\n"
    )
    return (
        "---\n"
        f"base_model: {json.dumps(stats['base_model'])}\n"
        "library_name: transformers\n"
        f"tags: {json.dumps(tags)}\n"
        "---\n\n"
        f"# {identity['name']}\n\n"
        f"{identity['name']} is an assistant fine-tuned from `{stats['base_model']}` with SELF-ALIGN "
        "(Sun et al., 2023, arXiv 2305.03047) by selfalign "
        f"{__version__}: supervised fine-tuning ({cfg.method}) on "
        f"{stats.get('data_description', ENGRAVE_DATA)}, trained without the principles in the "
        "prompt.\n\n"
        f"- Developer (as the assistant introduces itself): {identity['developer']}\n"
        f"- Knowledge cut-off (as stated): {identity['knowledge_cutoff']}\n"
        f"- Constitution: {stats['constitution']}\n"
        f"- Training data: `{sft_path}`\n\n"
        "## Data\n\n| count | value |\n|---|---|\n"
        f"{data_rows}\n\n"
        f"Cut-off {cfg.max_length} tokens; examples over it were "
        f"{'truncated' if cfg.overlong == 'truncate' else 'dropped'}.\n\n"
        "## Training\n\n"
        f"{stats['steps']} optimizer steps, effective batch {stats['effective_batch_size']} "
        f"(micro batch {stats['micro_batch_size']} x accumulation {stats['gradient_accumulation']} "
        f"x {stats['world_size']} device(s)), warm-up {stats['warmup_steps']} steps, precision "
        f"{stats['precision']}, final training loss {stats['train_loss']}.\n\n"
        f"```yaml\n{hyper}\n```\n\n"
        "## Use\n\n"
        "The chat template is in the tokenizer; a conversation without a system message gets the "
        "standard system prompt. Works with transformers, `vllm serve PATH` and any OpenAI chat "
        "client, and `selfalign chat PATH`.\n\n"
        f"{usage}\n"
        "## Reproduce\n\n"
        f"```\n{command}\n```\n"
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"selfalign": __version__}
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
