"""axolotl's YAML config -> a Migration.

Keys follow axolotl's documented config reference (base_model, adapter and lora_*, datasets with
type alpaca / chat_template / completion and the DPO row types, sequence_len, sample_packing,
rl, the trainer keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftune.errors import FtuneError
from ftune.migrate import Migration, hardware_from_deepspeed, read_config, template_choice

RL = {"dpo": "sigmoid", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo", "kto": "kto"}
TRAIN_KEYS = {
    "micro_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum", "learning_rate": "lr",
    "num_epochs": "epochs", "max_steps": "max_steps", "warmup_ratio": "warmup_ratio", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "seed": "seed", "save_steps": "save_every",
    "eval_steps": "eval_every", "save_total_limit": "save_total_limit", "logging_steps": "log_every",
}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_bnb_8bit": "adamw_8bit",
              "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit"}
# DPO row types: axolotl type -> ftune preference columns (prompt/chosen/rejected/system)
DPO_TYPES = {
    "chatml.intel": {"prompt": "question"}, "llama3.intel": {"prompt": "question"},
    "chatml.argilla": {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"},
    "llama3.argilla": {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"},
    "chatml.prompt_pairs": {}, "llama3.prompt_pairs": {}, "chatml.icr": {"prompt": "input"},
}
IGNORED = {
    "base_model_config": "the model folder's config is read", "model_type": "read from the model's config",
    "tokenizer_type": "the model's own tokenizer is used", "is_llama_derived_model": "read from the model's config",
    "strict": "ftune's schema refuses unknown keys", "dataset_prepared_path": "ftune's cache is keyed by everything "
    "that changes it", "wandb_project": "ftune writes TensorBoard events", "wandb_entity": "ftune writes TensorBoard "
    "events", "wandb_watch": "ftune writes TensorBoard events", "wandb_name": "ftune writes TensorBoard events",
    "wandb_log_model": "ftune writes TensorBoard events", "pad_to_sequence_len": "ftune pads per micro-batch",
    "tf32": "a GPU matmul setting torch picks", "xformers_attention": "ftune uses SDPA or flash-attention",
    "group_by_length": "ftune's batches keep the seeded order", "train_on_eos": "the end-of-turn token of each trained "
    "answer is trained", "special_tokens": "the tokenizer's own special tokens are used", "early_stopping_patience":
    "no early stopping in ftune", "resume_from_checkpoint": "resume with resume=<run dir>", "local_rank": "set by the "
    "launcher", "logging_steps": "carried", "debug": "use --debug", "evals_per_epoch": "use train.eval_every (steps)",
    "saves_per_epoch": "use train.save_every (steps)",
}


def _targets(cfg: dict) -> list[str]:
    if cfg.pop("lora_target_linear", False):
        cfg.pop("lora_target_modules", None)
        return ["all-linear"]
    modules = cfg.pop("lora_target_modules", None)
    return list(modules) if modules else ["all-linear"]


def _method(cfg: dict, m: Migration) -> None:
    adapter = cfg.pop("adapter", None)
    four = cfg.pop("load_in_4bit", False)
    eight = cfg.pop("load_in_8bit", False)
    if adapter in ("lora", "qlora"):
        m.groups["method"] = "qlora" if adapter == "qlora" or four else "lora"
        if eight:
            m.skip("load_in_8bit", "ftune quantises a LoRA base to 4 bits (method=qlora) or not at all")
        m.set("method", "r", cfg.pop("lora_r", 8))
        m.set("method", "alpha", cfg.pop("lora_alpha", 16))
        m.set("method", "dropout", cfg.pop("lora_dropout", 0.0))
        m.set("method", "target_modules", _targets(cfg))
        m.set("method", "use_dora", cfg.pop("peft_use_dora", None))
        m.set("method", "use_rslora", cfg.pop("peft_use_rslora", None))
        if cfg.get("lora_modules_to_save"):
            m.set("method", "modules_to_save", list(cfg.pop("lora_modules_to_save")))
        if cfg.get("loraplus_lr_ratio") and m.groups["method"] == "lora":
            m.set("method", "loraplus_lr_ratio", cfg.pop("loraplus_lr_ratio"))
    elif adapter in (None, "", "full"):
        m.groups["method"] = "full"
    else:
        m.skip("adapter", f"'{adapter}' is not lora or qlora; the recipe trains method=full")
        m.groups["method"] = "full"


def _preference(kind: Any, ds: dict, rl: str, where: str, m: Migration) -> tuple[str, dict[str, str]]:
    """(format, columns) of a DPO-family or KTO dataset entry."""
    if rl == "kto":
        return "feedback", {"prompt": ds.get("field_prompt", "prompt"), "completion": ds.get("field_completion", "completion"),
                            "label": ds.get("field_label", "label")}
    if kind in DPO_TYPES:
        return "preference", dict(DPO_TYPES[kind])
    if str(kind).startswith("chat_template"):
        return "preference", {"messages": ds.get("field_messages", "messages"), "chosen": ds.get("field_chosen", "chosen"),
                              "rejected": ds.get("field_rejected", "rejected")}
    m.skip(f"{where}.type", f"'{kind}' rows are read as prompt/chosen/rejected columns (format=preference)")
    return "preference", {}


def _source(i: int, ds: dict, base: Path, rl: str | None, m: Migration) -> dict[str, Any]:
    where = f"datasets[{i}]"
    if "path" not in ds:
        raise FtuneError(f"{where}: no path", hint="Each axolotl dataset entry names its path.")
    path = str(ds["path"])
    files = ds.get("data_files")
    local = (base / path) if not Path(path).is_absolute() else Path(path)
    if files:
        files = [files] if isinstance(files, str) else list(files)
        if len(files) > 1:
            m.skip(f"{where}.data_files", f"only the first of {len(files)} files is read; add a source per file")
        local = local / files[0] if local.is_dir() else base / files[0]
        path = str(local)
    elif local.exists() or local.suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt"):
        path = str(local.resolve())
    else:
        m.assumed.append(f"{where}.path={path}: read from the local Hugging Face cache (ftune downloads nothing)")
    source: dict[str, Any] = {"path": path}
    if ds.get("split"):
        source["split"] = ds["split"]
    if ds.get("name"):
        source["subset"] = ds["name"]
    kind = ds.get("type", "alpaca")
    columns: dict[str, str] = {}
    if isinstance(kind, dict):  # a custom instruction layout: its field names
        columns = {ours: kind[theirs] for ours, theirs in (("instruction", "field_instruction"), ("input", "field_input"),
                                                           ("output", "field_output"), ("system", "field_system"))
                   if kind.get(theirs)}
        if kind.get("format") or kind.get("no_input_format"):
            m.skip(f"{where}.type.format", "a custom prompt format string; the recipe's template renders the rows")
        kind = "alpaca"
    if rl:
        source["format"], columns = _preference(kind, ds, rl, where, m)
    elif kind == "alpaca" or str(kind).startswith("alpaca"):
        source["format"] = "alpaca"  # columns: a custom layout's fields (above), else alpaca's own
    elif kind in ("completion", "pretrain"):
        source["format"] = "text"
        columns = {"text": ds.get("field", "text")}
    elif kind in ("chat_template", "sharegpt"):
        source["format"] = "messages"
        columns = {"messages": ds.get("field_messages", "messages" if kind == "chat_template" else "conversations")}
        mapping = dict(ds.get("message_property_mappings") or {})
        for old in ("message_field_role", "message_field_content"):
            if ds.get(old):
                mapping[old.rsplit("_", 1)[1]] = ds[old]
        if kind == "sharegpt" and not mapping:
            mapping = {"role": "from", "content": "value"}
        if ds.get("message_field_training"):
            mapping["train"] = ds["message_field_training"]
        source["message_keys"] = {k: v for k, v in mapping.items() if k in ("role", "content", "train") and k != v}
        roles = {role: (vals if isinstance(vals, str) else list(vals)) for role, vals in (ds.get("roles") or {}).items()}
        if roles:
            source["roles"] = roles
        trained = ds.get("roles_to_train")
        if trained is not None and list(trained) not in (["assistant"], ["gpt"], ["assistant", "gpt"]):
            m.skip(f"{where}.roles_to_train", f"{list(trained)}: ftune trains assistant turns (and turns flagged "
                                              "train: true); dataset.train_on=all trains every token")
        if ds.get("message_field_training_detail"):
            m.skip(f"{where}.message_field_training_detail", "character-range training masks are not read")
    else:
        m.skip(f"{where}.type", f"'{kind}' has no ftune format; read as alpaca columns")
        source["format"] = "alpaca"
    if columns:
        source["columns"] = {k: v for k, v in columns.items() if k != v}
    return {k: v for k, v in source.items() if v != {}}


def _model(cfg: dict, m: Migration, path: Path) -> None:
    if "base_model" not in cfg:
        raise FtuneError(f"{path}: no base_model", hint="Is this an axolotl config?")
    m.model(str(cfg.pop("base_model")), bool(cfg.pop("trust_remote_code", False)))
    if cfg.pop("flash_attention", False):
        m.set("model", "attn_implementation", "flash_attention_2")
    if cfg.pop("sdp_attention", False):
        m.set("model", "attn_implementation", "sdpa")


def _stage(cfg: dict, m: Migration) -> str | None:
    """rl: dpo/ipo/orpo/simpo/kto is ftune's dpo stage with that loss; returns the rl name."""
    rl = cfg.pop("rl", None)
    if rl:
        m.groups["stage"] = "dpo"
        m.set("stage", "loss", RL.get(str(rl), "sigmoid"))
        if str(rl) not in RL:
            m.skip("rl", f"'{rl}' is not one of {', '.join(RL)}; DPO is used")
        beta = cfg.pop("rl_beta", cfg.pop("dpo_beta", None))
        m.set("stage", "beta", beta)
    else:
        m.groups["stage"] = "sft"
    return str(rl) if rl else None


def _data(cfg: dict, m: Migration, base: Path, rl: str | None) -> None:
    datasets = cfg.pop("datasets", None) or []
    if datasets:
        sources = [_source(i, ds, base, rl, m) for i, ds in enumerate(datasets)]
        if all(s["format"] == "text" for s in sources):
            m.groups["stage"] = "pt"
        m.set("dataset", "name", Path(str(datasets[0].get("path", "data"))).stem or "data")
        m.set("dataset", "sources", sources)
    else:
        m.skip("datasets", "no datasets; the recipe keeps ftune's default data (set dataset.sources)")
    if cfg.get("test_datasets"):
        tests = cfg.pop("test_datasets")
        m.set("dataset", "eval_path", str((base / tests[0]["path"]).resolve()) if tests and "path" in tests[0] else None)
        if len(tests) > 1:
            m.skip("test_datasets", f"only the first of {len(tests)} is read (dataset.eval_path)")
    m.set("dataset", "template", template_choice(cfg.pop("chat_template", None), m, "chat_template"))
    if cfg.get("chat_template_jinja"):
        m.skip("chat_template_jinja", "write the template into the model folder's tokenizer_config.json "
                                      "(dataset.template=model reads it) or as an ftune template file")
    cfg.pop("chat_template_jinja", None)
    m.set("dataset", "max_seq_len", cfg.pop("sequence_len", 2048))  # axolotl's default
    m.set("dataset", "packing", cfg.pop("sample_packing", None))
    if cfg.pop("train_on_inputs", False):
        m.set("dataset", "train_on", "all")
    if "val_set_size" in cfg:
        m.eval_fraction("val_set_size", cfg.pop("val_set_size"))


def _train(cfg: dict, m: Migration) -> None:
    for src, dst in TRAIN_KEYS.items():
        if src in cfg:
            m.set("train", dst, cfg.pop(src))
    if "optimizer" in cfg:
        opt = str(cfg.pop("optimizer"))
        m.set("train", "optim", OPTIMIZERS.get(opt))
        if opt not in OPTIMIZERS:
            m.skip("optimizer", f"'{opt}' is not one of {', '.join(sorted(set(OPTIMIZERS.values())))}")
    if "lr_scheduler" in cfg:
        m.scheduler("lr_scheduler", cfg.pop("lr_scheduler"), {n: n for n in ("cosine", "linear", "constant")})
    if "gradient_checkpointing" in cfg:
        m.set("train", "gradient_checkpointing", "true" if cfg.pop("gradient_checkpointing") else "false")
    if "output_dir" in cfg:
        m.output_dir(cfg.pop("output_dir"))


def _hardware(cfg: dict, m: Migration, path: Path) -> None:
    m.groups["hardware"] = "single-gpu"
    if cfg.get("deepspeed"):
        hardware_from_deepspeed(str(cfg.pop("deepspeed")), path.parent, m, "deepspeed")
    elif cfg.get("fsdp") or cfg.get("fsdp_config"):
        offload = "offload" in str(cfg.get("fsdp")) or (cfg.get("fsdp_config") or {}).get("fsdp_offload_params")
        m.groups["hardware"] = "fsdp-offload" if offload else "fsdp"
    cfg.pop("fsdp", None)
    cfg.pop("fsdp_config", None)
    if m.groups["hardware"] == "single-gpu":
        m.assumed.append("hardware=single-gpu: override with hardware=cpu, multi-gpu or fsdp")
    bf16, fp16 = cfg.pop("bf16", None), cfg.pop("fp16", None)
    m.set("hardware", "precision", "bf16" if bf16 in (True, "auto") else "fp16" if fp16 else "fp32")


def convert(path: Path) -> Migration:
    """The axolotl config at `path` (relative dataset paths are read from its folder)."""
    cfg = dict(read_config(path, "axolotl config (YAML)"))
    m = Migration("axolotl", path)
    _model(cfg, m, path)
    rl = _stage(cfg, m)
    _method(cfg, m)
    _data(cfg, m, path.parent, rl)
    _train(cfg, m)
    _hardware(cfg, m, path)
    m.leftovers(cfg, IGNORED)
    return m
