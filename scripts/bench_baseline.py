"""The baseline side of the benchmark: what a user writes without ftune — transformers + peft with
trl's SFTTrainer — with settings equal to ftune's arm (read from ftune's composed config).

Equal: model folder (ftune's converted SmolLM2), the tokenised samples and their loss mask
(ftune's pipeline; SFTTrainer takes pre-tokenised `input_ids` + `labels` as they are), the row
order of every step (ftune's seeded DataOrder, fed with the sequential sampler), sequence length,
micro-batch x accumulation, LoRA r/alpha/dropout/targets, AdamW lr/betas/eps/weight decay,
clipping, cosine schedule with the same warmup steps, autocast precision, no gradient
checkpointing (SFTConfig turns it on by default; ftune's arm has it off).

Left as a user gets them: SFTTrainer's padded, unpacked collation, its default optimiser
implementation (fused AdamW), trl loading the model in float32, trl's fused LM head.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from typing import Any

import torch
from bench_workload import Settings, compose_arm, load_samples, model_folder, step_rows

# Positions whose label is ignored by the loss (transformers and ftune agree on -100).
IGNORE = -100


def make_clock() -> Any:
    """A callback that stamps the end of every optimiser step (data loading included, as in ftune)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

    return StepClock()


def sft_config(cfg: Any, s: Settings, output_dir: str) -> Any:
    """SFTConfig with ftune's training settings."""
    from trl import SFTConfig

    t = cfg.train
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * s.steps)  # ftune's rule (train/optim.py)
    return SFTConfig(
        output_dir=output_dir, max_steps=s.steps, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=warmup, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_eps, max_grad_norm=t.max_grad_norm, seed=t.seed,
        bf16=cfg.hardware.precision == "bf16", fp16=cfg.hardware.precision == "fp16", use_cpu=s.device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing == "true", max_length=cfg.dataset.max_seq_len,
        # Sequential: the dataset is already in ftune's step order (same rows in the same steps).
        train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    m = cfg.method
    targets = "all-linear" if list(m.target_modules) == ["all-linear"] else list(m.target_modules)
    return LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=targets,
                      bias=m.bias, task_type="CAUSAL_LM")


def held_out_loss(model: Any, samples: list[dict], batch: int, pad_id: int, device: str, precision: str) -> float:
    """Token-mean loss on ftune's held-out samples (the same reduction ftune reports), in the
    training precision."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            width = max(len(x["input_ids"]) for x in chunk)
            ids = torch.tensor([x["input_ids"] + [pad_id] * (width - len(x["input_ids"])) for x in chunk], device=device)
            labels = torch.tensor([x["labels"] + [IGNORE] * (width - len(x["labels"])) for x in chunk], device=device)
            mask = torch.tensor([[1] * len(x["input_ids"]) + [0] * (width - len(x["input_ids"])) for x in chunk],
                                device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                             ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
    return total / max(count, 1)


def run(s: Settings) -> dict:
    """Train the baseline once; returns its measurements (step times, losses, memory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = compose_arm(s, packed=False)
    train_rows, eval_rows, tokenizer = load_samples(cfg)
    steps = step_rows(len(train_rows), cfg, s.steps)
    ordered = [train_rows[i] for rows in steps for i in rows]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ordered])
    if s.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    clock = make_clock()
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as out:
        trainer = SFTTrainer(model=model_folder(cfg), args=sft_config(cfg, s, out), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=[clock])
        # trl drops rows without a loss token and truncates to max_length: neither may apply here.
        assert len(trainer.train_dataset) == len(ordered), "SFTTrainer changed the rows"
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        eval_after = held_out_loss(trainer.model, eval_rows, cfg.train.micro_batch_size, tokenizer.pad_token_id,
                                   "cpu" if s.device == "cpu" else "cuda", cfg.hardware.precision)
    return {
        "step_seconds": [b - a for a, b in zip(clock.marks, clock.marks[1:])],
        "losses": losses, "eval_loss_after": eval_after, "threads": torch.get_num_threads(),
        "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "peak_gib_self": (torch.cuda.max_memory_allocated() / 2**30 if s.device != "cpu"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
    }
