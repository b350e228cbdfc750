"""Every rule a composed config must satisfy, in one place, checked before anything is loaded.

`derive` fills values that follow from other choices (qlora -> 4-bit base). `validate` returns
every problem as "key: what is wrong (got X); the fix", so users fix them all in one go.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ftune import resources
from ftune.config.registry import schemas
from ftune.config.rules import choice as _choice
from ftune.config.rules import positive as _positive
from ftune.config.schema import FtuneConfig
from ftune.registry import did_you_mean
from ftune.runtime import tristate, world_size

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATION = ("none", "4bit", "8bit")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULERS = ("cosine", "linear", "constant")
TRAIN_ON = ("assistant", "last", "all")


def template_names() -> list[str]:
    return sorted(["model", *(p.stem for p in resources.templates_dir().glob("*.yaml"))])


def derive(cfg: FtuneConfig) -> list[str]:
    """Settings implied by other settings, applied once after composition; returns notes that
    tell the user what was changed."""
    notes, no_packing = [], cfg.method.no_packing
    if no_packing or cfg.stage.whole_rows:
        cfg.dataset.padding_free = False  # rows cannot be shared (see packing below)
    if no_packing and cfg.dataset.packing:
        cfg.dataset.packing = False
        notes.append(f"method={cfg.method.name}: {no_packing}, so rows are not packed (dataset.packing=false)")
    if cfg.method.base_quantization and cfg.model.quantization == "none":
        cfg.model.quantization = cfg.method.base_quantization
    if cfg.dataset.template is None:
        cfg.dataset.template = cfg.model.template
    if cfg.stage.train_on:
        cfg.dataset.train_on = cfg.stage.train_on
    notes += _derive_scale_out(cfg)
    if cfg.stage.whole_rows and cfg.dataset.packing:
        cfg.dataset.packing = False
        notes.append(f"stage={cfg.stage.name} {cfg.stage.whole_rows}, so rows are not packed (dataset.packing=false)")
    return notes


def _derive_scale_out(cfg: FtuneConfig) -> list[str]:
    """Several processes split each step's micro-batches, so grad_accum must be a multiple of the
    process count. Keep the global batch (micro_batch_size x grad_accum rows) when it divides;
    otherwise grow grad_accum and say so."""
    hw, tr, notes = cfg.hardware, cfg.train, []
    tr.gradient_checkpointing = tristate(tr.gradient_checkpointing)  # the tri-state keys, parsed once
    hw.compile = tristate(hw.compile)
    if hw.activation_checkpointing and tr.gradient_checkpointing in ("auto", "false"):
        tr.gradient_checkpointing = "true"
    world = world_size(cfg)
    if world > 1 and hw.strategy == "none":
        hw.strategy = "ddp"
        notes.append(f"{world} processes: hardware.strategy=ddp")
    if world == 1 or tr.grad_accum % world == 0:
        return notes
    total = tr.micro_batch_size * tr.grad_accum
    ga = next((g for g in range(world, total + 1, world) if total % g == 0), None)
    if ga is not None:
        notes.append(f"{world} processes share each step: train.grad_accum {tr.grad_accum} -> {ga}, "
                     f"micro_batch_size {tr.micro_batch_size} -> {total // ga} (same global batch of {total})")
        tr.grad_accum, tr.micro_batch_size = ga, total // ga
    else:
        ga = world * -(-tr.grad_accum // world)
        notes.append(f"{world} processes: train.grad_accum {tr.grad_accum} -> {ga} (a multiple of the processes); "
                     f"the global batch grows from {total} to {tr.micro_batch_size * ga} rows")
        tr.grad_accum = ga
    return notes


def _check_model(cfg: FtuneConfig, problems: list[str]) -> None:
    m = cfg.model
    _choice(problems, "model.dtype", m.dtype, DTYPES)
    _choice(problems, "model.attn_implementation", m.attn_implementation, ATTENTION)
    _choice(problems, "model.quantization", m.quantization, QUANTIZATION)
    _choice(problems, "model.bnb_4bit_quant_type", m.bnb_4bit_quant_type, ("nf4", "fp4"))
    local = m.path.startswith(("/", "./", "../", "~")) or m.path.endswith(".gguf")
    if local and not m.path.startswith("package:") and not Path(os.path.expanduser(m.path)).exists():
        problems.append(f"model.path: {m.path} does not exist; give a hub id, a local folder or a .gguf file")


def _check_method(cfg: FtuneConfig, problems: list[str]) -> None:
    if cfg.method.name != type(cfg.method).name:  # method.name=… typed over another method's schema
        _choice(problems, "method.name", cfg.method.name, [type(cfg.method).name])
    problems += cfg.method.problems(cfg)  # each method's own rules, in its module


def _check_columns(problems: list[str], key: str, fmt: str, columns: dict[str, str], fields: Any) -> None:
    """`columns` maps the format's fields to the file's column names; a key that is no field of
    the format would be ignored, so it is refused (and a mapping written the other way round is
    recognised)."""
    if fields is None:
        return
    for field_name, column in columns.items():
        if field_name in fields:
            continue
        if column in fields:
            problems.append(f"{key}.columns: '{field_name}: {column}' is the other way round; write "
                            f"'{column}: {field_name}' (format field: your column name)")
        else:
            problems.append(f"{key}.columns: '{field_name}' is not a field of format={fmt} (its fields: "
                            f"{', '.join(fields)}); write <field>: <your column name>")


def _check_dataset(cfg: FtuneConfig, problems: list[str]) -> None:
    d, formats = cfg.dataset, sorted(schemas("format"))
    if not d.sources:
        problems.append("dataset.sources is empty; add at least one {path, format}")
    for i, src in enumerate(d.sources):
        key = f"dataset.sources[{i}]"
        _choice(problems, f"{key}.format", src.format, formats)
        if src.weight <= 0:
            problems.append(f"{key}.weight must be > 0 (got {src.weight})")
        _check_columns(problems, key, src.format, dict(src.columns), schemas("format").get(src.format))
        for part, known in schemas("conversation").items():  # message_keys, roles
            for name in sorted(set(getattr(src, part)) - set(known)):
                problems.append(f"{key}.{part}: '{name}' is not one of {', '.join(known)}"
                                f"{did_you_mean(name, known)} (write <{'part' if part == 'message_keys' else 'role'}>: "
                                f"<your file's name for it>)")
        path = resources.resolve_path(src.path)
        looks_local = (src.path.startswith("ftune:") or Path(path).suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt")
                       ) and not set("*?[") & set(str(path))
        if looks_local and not Path(path).exists():
            problems.append(f"{key}.path: file {path} does not exist")
        if str(path).endswith(".txt") and src.format != "text":
            problems.append(f"{key}.format={src.format}, but {src.path} is plain text: set {key}.format=text "
                            "(each .txt file is one document)")
        allowed = cfg.stage.formats
        if src.format in formats and src.format not in allowed:
            users = [name for name, stage in sorted(schemas("stage").items()) if src.format in stage.formats]
            problems.append(f"{key}.format={src.format} does not fit stage={cfg.stage.name}: it takes "
                            f"{' or '.join(f'format={a}' for a in allowed)}; format={src.format} is for "
                            f"{' or '.join(f'stage={u}' for u in users)}")
    if str(d.template).endswith((".yaml", ".yml")):  # a template file of the user's
        if not Path(str(d.template)).expanduser().is_file():
            problems.append(f"dataset.template: file {d.template} does not exist")
    else:
        _choice(problems, "dataset.template", d.template, template_names())
    _choice(problems, "dataset.train_on", d.train_on, TRAIN_ON)
    _choice(problems, "dataset.on_bad_row", d.on_bad_row, ("fail", "skip"))
    if d.max_seq_len < 16:
        problems.append(f"dataset.max_seq_len must be >= 16 (got {d.max_seq_len})")
    if not 0 <= d.eval_fraction < 1:
        problems.append(f"dataset.eval_fraction must be in [0, 1) (got {d.eval_fraction})")
    if d.eval_path and not Path(resources.resolve_path(d.eval_path)).exists():
        problems.append(f"dataset.eval_path: file {d.eval_path} does not exist")
    if d.max_rows is not None and d.max_rows <= 0:
        problems.append(f"dataset.max_rows must be > 0 or null (got {d.max_rows})")


def _check_stage_hardware(cfg: FtuneConfig, problems: list[str]) -> None:
    if cfg.stage.name != type(cfg.stage).name:  # stage.name=… typed over another stage's schema
        _choice(problems, "stage.name", cfg.stage.name, [type(cfg.stage).name])
    problems += cfg.stage.problems(cfg)  # each stage's own rules, in its module
    hw = cfg.hardware
    _choice(problems, "hardware.device", hw.device, ("auto", "cpu", "cuda"))
    _choice(problems, "hardware.precision", hw.precision, PRECISIONS)
    _check_scale_out(cfg, problems)
    if hw.device == "cpu" and hw.precision == "fp16":
        problems.append("hardware.precision=fp16 is not supported on CPU; use bf16 or fp32")
    # bitsandbytes' 4-bit layers run on CPU (measured: QLoRA trains there); its paged/8-bit
    # optimisers are CUDA-only.
    if hw.device == "cpu" and cfg.train.optim != "adamw":
        problems.append(f"train.optim={cfg.train.optim} needs bitsandbytes on CUDA; use train.optim=adamw on CPU")


def _check_scale_out(cfg: FtuneConfig, problems: list[str]) -> None:
    hw = cfg.hardware
    _choice(problems, "hardware.strategy", hw.strategy, ("none", "ddp", "fsdp", "deepspeed"))
    _choice(problems, "hardware.attn_implementation", hw.attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2"))
    _choice(problems, "hardware.compile", hw.compile, ("auto", "true", "false"))
    if hw.compile == "true" and hw.strategy in ("fsdp", "deepspeed"):
        problems.append(f"hardware.compile=true works with strategy none or ddp (got {hw.strategy}); "
                        "set hardware.compile=false or auto")
    if hw.num_processes < 0 or hw.num_nodes < 1:
        problems.append(f"hardware.num_processes must be >= 0 and hardware.num_nodes >= 1 "
                        f"(got {hw.num_processes}, {hw.num_nodes})")
    if hw.strategy == "deepspeed" and hw.zero_stage not in (2, 3):
        problems.append(f"hardware.zero_stage must be 2 or 3 with strategy=deepspeed (got {hw.zero_stage})")
    if hw.strategy != "deepspeed" and (hw.zero_stage or hw.offload_optimizer or hw.offload_params):
        problems.append("hardware.zero_stage/offload_optimizer/offload_params apply to strategy=deepspeed only")
    if hw.offload_params and hw.zero_stage != 3:
        problems.append("hardware.offload_params needs zero_stage=3 (ZeRO-2 does not shard parameters)")
    if hw.cpu_offload and hw.strategy != "fsdp":
        problems.append("hardware.cpu_offload applies to strategy=fsdp only (DeepSpeed: offload_optimizer/offload_params)")
    if hw.device == "cpu" and hw.strategy == "deepspeed":
        problems.append("strategy=deepspeed needs CUDA GPUs; on CPU use strategy=fsdp (FSDP2 over gloo) or ddp")
    if hw.device == "cpu" and hw.liger:
        problems.append("hardware.liger=true needs CUDA (Liger kernels are Triton kernels); set it false on CPU")
    if world_size(cfg) > 1:
        if cfg.stage.one_process:
            problems.append(f"stage={cfg.stage.name} {cfg.stage.one_process}")
        if cfg.method.one_process:
            problems.append(f"method={cfg.method.name} {cfg.method.one_process}")
        if hw.strategy in ("fsdp", "deepspeed") and cfg.model.quantization != "none":
            problems.append(f"model.quantization={cfg.model.quantization} (qlora) with strategy={hw.strategy} is not "
                            "supported in this release; use strategy=ddp for QLoRA on several GPUs")


def _check_train(cfg: FtuneConfig, problems: list[str]) -> None:
    t = cfg.train
    _choice(problems, "train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    _positive(problems, "train.lr", t.lr)
    _positive(problems, "train.micro_batch_size", t.micro_batch_size)
    _positive(problems, "train.grad_accum", t.grad_accum)
    _positive(problems, "train.weight_decay", t.weight_decay, allow_zero=True)
    _positive(problems, "train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    _positive(problems, "train.save_total_limit", t.save_total_limit)
    _choice(problems, "train.optim", t.optim, OPTIMIZERS)
    _choice(problems, "train.lr_scheduler", t.lr_scheduler, SCHEDULERS)
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"train.max_steps must be > 0, or -1 to use train.epochs (got {t.max_steps})")
    if t.max_steps == -1 and t.epochs <= 0:
        problems.append(f"train.epochs must be > 0 (got {t.epochs})")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    for key in ("warmup_steps", "eval_every", "save_every", "sample_max_new_tokens"):
        _positive(problems, f"train.{key}", getattr(t, key), allow_zero=True)
    _positive(problems, "train.log_every", t.log_every)
    gc = t.gradient_checkpointing  # lower-cased by derive(), which runs first
    if gc not in ("auto", "true", "false") and not gc.isdigit():
        problems.append(f"train.gradient_checkpointing must be auto, true, false or a number of decoder layers "
                        f"to recompute (got {t.gradient_checkpointing!r})")
    if t.resume.lower() == "true" and not t.run_name:
        problems.append("train.resume=true needs train.run_name (the run to continue), or give resume=<run or "
                        "checkpoint path>")


def validate(cfg: FtuneConfig) -> list[str]:
    """All problems of a composed config, in key order; an empty list means valid."""
    problems: list[str] = []
    for check in (_check_model, _check_method, _check_dataset, _check_stage_hardware, _check_train):
        check(cfg, problems)
    return problems
