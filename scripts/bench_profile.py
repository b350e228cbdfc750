"""Where the time of one ftune training step goes, on the benchmark's workload.

    .venv/bin/python scripts/bench_profile.py                       # unpacked, 8 samples per step
    .venv/bin/python scripts/bench_profile.py dataset.packing=true train.micro_batch_size=2

The model, data, method, optimiser and accelerator are set up with ftune's own functions (as
ftune/train/run.py does), then steps run through ftune's `train_step`. Two passes:
1. phase timers: collation, forward (+ loss), backward, clipping, optimiser step — the same work
   as train_step, split with wall-clock timers around each phase;
2. torch.profiler over the same steps: self time of every operator, grouped into categories by
   operator name and tensor shapes (LM-head matmuls have the vocabulary as a dimension, LoRA
   matmuls the rank).
Prints both tables and adds them to bench/profile.json under the overrides given ("default" for none).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASE_OVERRIDES = ["dataset.packing=false", "train.micro_batch_size=8", "train.max_steps=12",
                  "train.sample_max_new_tokens=0", "train.tensorboard=false"]


def setup(overrides: list[str]) -> dict:
    """ftune's run setup up to the loop (ftune/train/run.py, without the run directory)."""
    from ftune import runtime
    from ftune.config.compose import compose
    from ftune.data.build import build
    from ftune.data.order import DataOrder
    from ftune.methods import Setup, apply, hooks_for
    from ftune.models import load as model_load
    from ftune.train import objectives
    from ftune.train.optim import build_optimizer, build_scheduler
    from ftune.train.run import make_accelerator, seed_everything

    cfg = compose([*BASE_OVERRIDES, *overrides]).cfg
    seed_everything(cfg.train.seed)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    device = runtime.pick_device(cfg)
    accelerator = make_accelerator(cfg, device)
    model, tokenizer = model_load.load(cfg, accelerator.device)
    data = build(cfg.dataset, cfg.stage.name, cfg.train.seed, tokenizer)
    model = apply(model, cfg, Setup(total_steps=cfg.train.max_steps, model_path=model.name_or_path))
    optimizer = build_optimizer(model, cfg.train, hooks_for(cfg).lr_scale)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    return {"cfg": cfg, "model": model, "optimizer": optimizer, "scheduler": scheduler, "accelerator": accelerator,
            "objective": objectives.get(cfg.stage, cfg.dataset, model), "train": data.train, "pad_id": tokenizer.pad_token_id,
            "order": DataOrder(len(data.train), cfg.train.micro_batch_size, cfg.train.seed)}


def micro_batches(p: dict, step: int) -> list[list[dict]]:
    g = p["cfg"].train.grad_accum
    return [[p["train"][i] for i in p["order"].micro(m)] for m in range(step * g, (step + 1) * g)]


def timed_step(p: dict, step: int, clock: dict[str, float]) -> int:
    """One step as ftune's train_step does it (one process), with a timer per phase."""
    acc, objective = p["accelerator"], p["objective"]
    t0 = time.perf_counter()
    batches = [{k: v.to(acc.device) for k, v in objective.collate(rows, p["pad_id"]).items()}
               for rows in micro_batches(p, step)]
    n_targets = sum(objective.count(b) for b in batches)
    t1 = time.perf_counter()
    clock["collate"] += t1 - t0
    for batch in batches:
        t1 = time.perf_counter()
        with acc.autocast():
            loss_sum, _, _ = objective.loss(p["model"], batch)
            loss = loss_sum / n_targets
        t2 = time.perf_counter()
        acc.backward(loss)
        t3 = time.perf_counter()
        float(loss_sum.detach())
        clock["forward + loss"] += t2 - t1
        clock["backward"] += t3 - t2
    t3 = time.perf_counter()
    acc.clip_grad_norm_([q for q in p["model"].parameters() if q.requires_grad], 1.0)
    t4 = time.perf_counter()
    p["optimizer"].step()
    p["scheduler"].step()
    p["optimizer"].zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    clock["clip grad norm"] += t4 - t3
    clock["optimizer step"] += t5 - t4
    return sum(int(b["num_tokens"]) for b in batches)


def category(name: str, shapes: list, vocab: int, rank: int) -> str:
    """An operator's share of the step, from its name and its input shapes."""
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s}
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"):
        return "matmul: LM head" if vocab in dims else "matmul: LoRA" if rank in dims else "matmul: frozen linears"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (SDPA)"
    if any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy")):
        return "loss: log-softmax + NLL"
    if name in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"):
        return "dtype casts / copies"
    if name.startswith("aten::_foreach") or "adam" in name.lower() or "Optimizer" in name:
        return "optimizer"
    if name in ("aten::embedding", "aten::embedding_dense_backward", "aten::embedding_backward"):
        return "embedding"
    if name.startswith("aten::"):
        return "elementwise / norms / other aten"
    return "other"


def profile_steps(p: dict, steps: range) -> tuple[dict[str, float], float, int]:
    """(self CPU seconds per category, wall seconds, tokens) over `steps` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from ftune.train.trainer import train_step

    model_cfg = p["cfg"]
    vocab = p["model"].get_input_embeddings().weight.shape[0]
    rank = model_cfg.method.r
    tokens = 0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for step in steps:
            batches = [{k: v.to(p["accelerator"].device) for k, v in p["objective"].collate(rows, p["pad_id"]).items()}
                       for rows in micro_batches(p, step)]
            metrics = train_step(p["model"], p["objective"], batches, p["accelerator"], p["optimizer"],
                                 p["scheduler"], 1.0, None, step)
            tokens += metrics["tokens"]
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.self_cpu_time_total > 0:
            totals[category(evt.key, evt.input_shapes, vocab, rank)] += evt.self_cpu_time_total / 1e6
    return dict(totals), wall, tokens


def shares(table: dict[str, float], wall: float) -> list[tuple[str, float, float]]:
    rows = sorted(table.items(), key=lambda kv: -kv[1])
    return [(k, v, 100 * v / wall) for k, v in rows]


def main(overrides: list[str]) -> None:
    p = setup(overrides)
    steps = p["cfg"].train.max_steps
    half = max(2, steps // 2)
    clock: dict[str, float] = defaultdict(float)
    timed_step(p, 0, clock)  # warm-up, not counted
    clock.clear()
    start, tokens = time.perf_counter(), 0
    for step in range(1, half):
        tokens += timed_step(p, step, clock)
    wall = time.perf_counter() - start
    clock["other (python, metrics)"] = wall - sum(clock.values())
    print(f"threads {torch.get_num_threads()}; phase timers over {half - 1} steps: {wall:.2f} s, "
          f"{tokens / wall:.1f} tokens/s")
    for name, sec, pct in shares(clock, wall):
        print(f"  {name:28s} {sec:7.2f} s  {pct:5.1f}%")
    ops, pwall, ptokens = profile_steps(p, range(half, steps))
    ops["not in operators (python, dispatch)"] = max(0.0, pwall - sum(ops.values()))
    print(f"profiler over {steps - half} steps: {pwall:.2f} s ({ptokens / pwall:.1f} tokens/s under the profiler)")
    for name, sec, pct in shares(ops, pwall):
        print(f"  {name:36s} {sec:7.2f} s  {pct:5.1f}%")
    out = ROOT / "bench" / "profile.json"
    out.parent.mkdir(exist_ok=True)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved[" ".join(overrides) or "default"] = {
        "overrides": [*BASE_OVERRIDES, *overrides], "threads": torch.get_num_threads(),
        "phases": {"wall_s": wall, "tokens": tokens, "seconds": dict(clock)},
        "operators": {"wall_s": pwall, "tokens": ptokens, "seconds": ops}}
    out.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
