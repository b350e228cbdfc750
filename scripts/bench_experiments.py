"""Changes inside the training step that no config reaches, measured on the benchmark's ftune arm
without editing ftune: each variant swaps one piece of ftune's step in this process only.

    .venv/bin/python scripts/bench_experiments.py                              # unpacked, 8 samples
    .venv/bin/python scripts/bench_experiments.py dataset.packing=true train.micro_batch_size=2

Variants (each timed over the same steps, alternating, after a warm-up step):
- ftune: ftune's own train_step;
- target-logits: the LM head and cross-entropy only at positions whose next token carries the
  loss (what trl's fused head does), instead of fp32 logits for every position;
- bf16-adapters: LoRA weights stored in bf16 (ftune keeps them in fp32, so every LoRA matmul
  casts) — an upper bound on what removing the casts gains; it changes the optimiser's precision;
- both.
Prints tokens/s per variant and the loss of the first timed step (to show the variant computes the
same loss).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from bench_profile import micro_batches, setup

IGNORE = -100


def target_logits_loss(model: Any, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Sum of token losses with logits computed only where a target is."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    inner = model.get_base_model()
    hidden = inner.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = inner.lm_head(hidden[keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum"), int(keep.sum()), {}


def adapters_to_bf16(model: Any, optimizer: Any) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    optimizer.optimizer.state.clear()  # AdamW's moments were fp32; they restart in bf16


def run_variant(p: dict, steps: range, loss_fn: Any | None) -> tuple[float, float]:
    """(tokens/s, loss of the first step) over `steps` with ftune's train_step."""
    from dataclasses import replace

    from ftune.train.trainer import train_step

    objective = replace(p["objective"], loss=loss_fn) if loss_fn else p["objective"]
    tokens, first, start = 0, None, time.perf_counter()
    for step in steps:
        batches = [objective.collate(rows, p["pad_id"]) for rows in micro_batches(p, step)]
        m = train_step(p["model"], objective, batches, p["accelerator"], p["optimizer"], p["scheduler"], 1.0, None, step)
        tokens += m["tokens"]
        first = m["loss"] if first is None else first
    return tokens / (time.perf_counter() - start), first


def main(overrides: list[str]) -> None:
    p = setup([*overrides, "train.max_steps=40", "train.lr=1e-12"])  # ~no update: every variant sees the same weights
    run_variant(p, range(0, 1), None)  # warm-up
    plain, fused = None, target_logits_loss
    results: dict[str, list[float]] = {}
    step = 1
    for round_ in range(2):
        for name in (["ftune", "target-logits"] if round_ == 0 else ["target-logits", "ftune"]):
            tps, loss = run_variant(p, range(step, step + 4), fused if name == "target-logits" else plain)
            results.setdefault(name, []).append(tps)
            print(f"{name:28s} {tps:7.1f} tok/s  loss {loss:.4f}", flush=True)
    adapters_to_bf16(p["model"], p["optimizer"])
    for name, fn in (("bf16-adapters", plain), ("bf16-adapters+target-logits", fused)):
        tps, loss = run_variant(p, range(step, step + 4), fn)
        results.setdefault(name, []).append(tps)
        print(f"{name:28s} {tps:7.1f} tok/s  loss {loss:.4f}", flush=True)
    print({k: round(sum(v) / len(v), 1) for k, v in results.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
