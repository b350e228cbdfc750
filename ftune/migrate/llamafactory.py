"""LLaMA-Factory's training YAML (and its data/dataset_info.json) -> a Migration.

Keys follow LLaMA-Factory's documented arguments (model, method, dataset, output, train and eval
groups of examples/train_*/*.yaml) and dataset_info.json's entries (file_name, formatting,
ranking, columns, tags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftune.errors import FtuneError
from ftune.migrate import Migration, hardware_from_deepspeed, read_config, template_choice

STAGES = {"sft": "sft", "pt": "pt", "rm": "rm", "dpo": "dpo", "kto": "dpo", "ppo": "ppo"}
PREF_LOSSES = {"sigmoid": "sigmoid", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}
TRAIN_KEYS = {  # LLaMA-Factory key -> ftune train.* key, same meaning
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "max_steps", "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_steps", "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "seed": "seed",
    "save_steps": "save_every", "eval_steps": "eval_every", "save_total_limit": "save_total_limit",
    "logging_steps": "log_every",
}
HF_DEFAULTS = {"num_train_epochs": 3.0, "learning_rate": 5e-5, "per_device_train_batch_size": 8,
               "lr_scheduler_type": "linear"}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
IGNORED = {  # keys with no effect on what is trained, or that ftune always does
    "do_train": "ftune always trains", "overwrite_cache": "ftune's cache is keyed by everything that changes it",
    "overwrite_output_dir": "use --overwrite", "plot_loss": "ftune always writes loss.png", "report_to": "ftune writes "
    "TensorBoard events (train.tensorboard)", "preprocessing_num_workers": "tokenisation runs in this process",
    "dataloader_num_workers": "ftune's batches are built in the training process", "ddp_timeout": "not a setting "
    "in ftune", "save_only_model": "ftune checkpoints always hold what resuming needs", "trust_remote_code":
    "carried as model.trust_remote_code", "per_device_eval_batch_size": "held-out batches use micro_batch_size",
    "eval_strategy": "train.eval_every > 0 evaluates", "resume_from_checkpoint": "resume with resume=<run dir>",
    "dataset_dir": "used to find dataset_info.json and the data files", "do_eval": "ftune evaluates on the held-out split",
    "flash_attn": "carried as model.attn_implementation", "bf16": "carried as hardware.precision",
    "fp16": "carried as hardware.precision", "finetuning_type": "carried as the method", "stage": "carried as the stage",
}


def _targets(value: Any) -> list[str]:
    if value in (None, "", "all"):
        return ["all-linear"]
    return [t.strip() for t in str(value).split(",") if t.strip()] if isinstance(value, str) else list(value)


def _method(cfg: dict, m: Migration) -> None:
    kind = cfg.get("finetuning_type", "lora")
    quant = cfg.get("quantization_bit")
    if kind == "lora":
        m.groups["method"] = "qlora" if quant == 4 else "lora"
        if quant not in (None, 4):
            m.skip("quantization_bit", f"{quant}-bit: ftune quantises a LoRA base to 4 bits (method=qlora) or not at all")
        m.set("method", "r", cfg.get("lora_rank", 8))
        m.set("method", "alpha", cfg.get("lora_alpha", 2 * int(cfg.get("lora_rank", 8))))
        m.set("method", "dropout", cfg.get("lora_dropout", 0.0))
        m.set("method", "target_modules", _targets(cfg.get("lora_target")))
        for src, dst in (("use_dora", "use_dora"), ("use_rslora", "use_rslora"), ("loraplus_lr_ratio", "loraplus_lr_ratio")):
            if m.groups["method"] == "lora" or dst != "loraplus_lr_ratio":
                m.set("method", dst, cfg.get(src))
        if cfg.get("pissa_init"):
            m.set("method", "init", "pissa")
        if cfg.get("additional_target"):
            m.set("method", "modules_to_save", _targets(cfg["additional_target"]))
    elif kind == "full":
        m.groups["method"] = "full"
    elif kind == "freeze":
        m.groups["method"] = "freeze"
        m.set("method", "trainable_layers", cfg.get("freeze_trainable_layers", 2))
    else:
        m.skip("finetuning_type", f"'{kind}' is not one of lora, full, freeze")
    for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora", "use_rslora", "loraplus_lr_ratio",
                "pissa_init", "additional_target", "quantization_bit", "freeze_trainable_layers", "quantization_method"):
        cfg.pop(key, None)


def _source(name: str, entry: dict, base: Path, stage: str, m: Migration) -> dict[str, Any]:
    """One dataset_info.json entry -> a dataset source (path, format, columns, message keys, roles)."""
    where = f"dataset_info.json: {name}"
    if "file_name" in entry:
        path = str((base / entry["file_name"]).resolve())
    elif "hf_hub_url" in entry:
        path = entry["hf_hub_url"]
        m.assumed.append(f"{where}: read from the local Hugging Face cache as '{path}' (ftune downloads nothing)")
    else:
        raise FtuneError(f"{where}: no file_name or hf_hub_url", hint="Give the entry a file_name (a file in dataset_dir).")
    cols = dict(entry.get("columns") or {})
    sharegpt = entry.get("formatting", "alpaca") == "sharegpt"
    source: dict[str, Any] = {"path": path}
    if entry.get("subset"):
        source["subset"] = entry["subset"]
    if entry.get("split"):
        source["split"] = entry["split"]
    columns: dict[str, str] = {}
    if stage == "pt":
        source["format"] = "text"
        columns["text"] = cols.get("prompt", "text")
    elif entry.get("ranking"):
        source["format"] = "preference"
        for ours, theirs in (("chosen", "chosen"), ("rejected", "rejected"), ("system", "system")):
            if cols.get(theirs):
                columns[ours] = cols[theirs]
        if sharegpt:
            columns["conversations"] = cols.get("messages", "conversations")
        else:
            columns["instruction"], columns["input"] = cols.get("prompt", "instruction"), cols.get("query", "input")
    elif "kto_tag" in cols:
        source["format"] = "feedback"
        columns["label"] = cols["kto_tag"]
        if sharegpt:
            columns["conversations"] = cols.get("messages", "conversations")
        else:
            columns["prompt"], columns["completion"] = cols.get("prompt", "instruction"), cols.get("response", "output")
            if cols.get("query"):
                m.skip(f"{where}: columns.query", "a KTO row's input column is not joined to its prompt in ftune")
    elif sharegpt:
        source["format"] = "sharegpt"
        columns["conversations"] = cols.get("messages", "conversations")
        for key in ("system", "tools"):
            if cols.get(key):
                columns[key] = cols[key]
    else:
        source["format"] = "alpaca"
        for ours, theirs, default in (("instruction", "prompt", "instruction"), ("input", "query", "input"),
                                      ("output", "response", "output"), ("system", "system", None),
                                      ("history", "history", None)):
            if cols.get(theirs, default):
                columns[ours] = cols.get(theirs, default)
    for key in ("images", "videos", "audios"):
        if key in cols:
            m.skip(f"{where}: columns.{key}", "ftune trains text models; the column is not read")
    source["columns"] = {k: v for k, v in columns.items() if k != v}
    tags = dict(entry.get("tags") or {})
    keys = {"role": tags.get("role_tag"), "content": tags.get("content_tag")}
    source["message_keys"] = {k: v for k, v in keys.items() if v}
    roles = {"user": tags.get("user_tag"), "assistant": tags.get("assistant_tag"), "tool": tags.get("observation_tag"),
             "tool_call": tags.get("function_tag"), "system": tags.get("system_tag")}
    source["roles"] = {k: v for k, v in roles.items() if v}
    return {k: v for k, v in source.items() if v != {}}


def _dataset(cfg: dict, info: dict | None, base: Path, stage: str, m: Migration) -> None:
    names = [n.strip() for n in str(cfg.pop("dataset", "") or "").split(",") if n.strip()]
    if not names:
        m.skip("dataset", "no dataset named; the recipe keeps ftune's default data (set dataset.sources)")
        return
    if info is None:
        raise FtuneError(f"dataset: {', '.join(names)} are names in LLaMA-Factory's dataset_info.json, which was not found",
                         hint="Give it with --dataset-info path/to/dataset_info.json.")
    missing = [n for n in names if n not in info]
    if missing:
        raise FtuneError(f"dataset: {', '.join(missing)} not in the dataset_info.json given",
                         [f"its entries: {', '.join(sorted(info)[:20])}"], "Check the names, or the --dataset-info file.")
    m.set("dataset", "name", names[0] if len(names) == 1 else "+".join(names))
    m.set("dataset", "sources", [_source(n, info[n], base, stage, m) for n in names])
    if cfg.get("eval_dataset"):
        m.skip("eval_dataset", "ftune holds out dataset.eval_fraction of the rows, or reads dataset.eval_path (one file)")
    cfg.pop("eval_dataset", None)


def _model(cfg: dict, m: Migration, path: Path) -> None:
    if "model_name_or_path" not in cfg:
        raise FtuneError(f"{path}: no model_name_or_path", hint="Is this a LLaMA-Factory training config?")
    m.model(str(cfg.pop("model_name_or_path")), bool(cfg.get("trust_remote_code")))
    if cfg.get("flash_attn") in ("fa2", "sdpa", "eager"):
        m.set("model", "attn_implementation", {"fa2": "flash_attention_2"}.get(cfg["flash_attn"], cfg["flash_attn"]))


def _stage(cfg: dict, m: Migration) -> str:
    """LLaMA-Factory's stage (kto is ftune's dpo stage with loss=kto); returns its own name."""
    stage = str(cfg.get("stage", "sft"))
    if stage not in STAGES:
        m.skip("stage", f"'{stage}' is not one of {', '.join(STAGES)}; the recipe trains stage=sft")
        stage = "sft"
    m.groups["stage"] = STAGES[stage]
    if stage == "kto":
        m.set("stage", "loss", "kto")
    if stage == "dpo":
        loss = str(cfg.pop("pref_loss", "sigmoid"))
        m.set("stage", "loss", PREF_LOSSES.get(loss, "sigmoid"))
        if loss not in PREF_LOSSES:
            m.skip("pref_loss", f"'{loss}' is not one of {', '.join(PREF_LOSSES)}; sigmoid (DPO) is used")
    if stage in ("dpo", "kto") and "pref_beta" in cfg:
        m.set("stage", "beta", cfg.pop("pref_beta"))
    if stage == "ppo" and cfg.get("reward_model"):
        m.set("stage", "reward_model", cfg.pop("reward_model"))
        m.assumed.append("reward_model: an ftune reward-model run directory (train it with stage=rm)")
    return stage


def _rendering(cfg: dict, m: Migration) -> None:
    """Template, cutoff, packing and what is trained."""
    m.set("dataset", "template", template_choice(cfg.pop("template", None), m, "template"))
    m.set("dataset", "max_seq_len", cfg.pop("cutoff_len", 2048))  # LLaMA-Factory's default cutoff
    for key, value in (("packing", cfg.pop("packing", None)), ("max_rows", cfg.pop("max_samples", None))):
        m.set("dataset", key, value)
    if cfg.pop("neat_packing", None):
        m.set("dataset", "packing", True)
        m.assumed.append("neat_packing: ftune's packing never attends across samples")
    if cfg.pop("train_on_prompt", False):
        m.set("dataset", "train_on", "all")
    if cfg.pop("mask_history", False):
        m.set("dataset", "train_on", "last")
    if "val_size" in cfg:
        m.eval_fraction("val_size", cfg.pop("val_size"))


def _train(cfg: dict, m: Migration) -> None:
    for src, value in HF_DEFAULTS.items():  # what LLaMA-Factory trains with when a key is left out
        if src not in cfg:
            cfg[src] = value
            m.assumed.append(f"{src}={value} (the Hugging Face Trainer's default, which LLaMA-Factory uses)")
    for src, dst in TRAIN_KEYS.items():
        if src in cfg:
            m.set("train", dst, cfg.pop(src))
    if "lr_scheduler_type" in cfg:
        m.scheduler("lr_scheduler_type", cfg.pop("lr_scheduler_type"), SCHEDULERS)
    if "output_dir" in cfg:
        m.output_dir(cfg.pop("output_dir"))
    if cfg.pop("disable_gradient_checkpointing", None):
        m.set("train", "gradient_checkpointing", "false")


def _hardware(cfg: dict, m: Migration, path: Path) -> None:
    m.groups["hardware"] = "single-gpu"
    if "deepspeed" in cfg:
        hardware_from_deepspeed(str(cfg.pop("deepspeed")), path.parent, m, "deepspeed")
    if m.groups["hardware"] == "single-gpu":
        m.assumed.append("hardware=single-gpu (LLaMA-Factory runs on the visible GPUs): override with hardware=cpu, "
                         "multi-gpu or fsdp")
    m.set("hardware", "precision", "bf16" if cfg.get("bf16") else "fp16" if cfg.get("fp16") else "fp32")


def convert(path: Path, dataset_info: Path | None = None) -> Migration:
    """The config at `path` (its dataset_info.json found next to it unless given)."""
    cfg = dict(read_config(path, "LLaMA-Factory training config (YAML)"))
    m = Migration("LLaMA-Factory", path)
    base = Path(cfg.get("dataset_dir") or "data")
    info_path = dataset_info or next((p for p in (path.parent / base / "dataset_info.json", base / "dataset_info.json",
                                                  path.parent / "dataset_info.json") if p.is_file()), None)
    info = read_config(Path(info_path), "dataset_info.json") if info_path else None
    _model(cfg, m, path)
    stage = _stage(cfg, m)
    _method(cfg, m)
    _dataset(cfg, info, Path(info_path).parent if info_path else base, stage, m)
    _rendering(cfg, m)
    _train(cfg, m)
    _hardware(cfg, m, path)
    m.leftovers(cfg, IGNORED)
    return m
