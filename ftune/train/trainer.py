"""The one training loop (every stage), written as plain functions around an Accelerator.

A step gathers `grad_accum` micro-batches, counts their target tokens first, and backpropagates
each micro-batch's *summed* loss divided by that count: the accumulated gradient is exactly the
gradient of the token-mean loss over the whole step, as if it were one large batch.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftune.config.schema import TrainConfig
from ftune.data.order import DataOrder
from ftune.errors import FtuneError
from ftune.methods import StepHooks
from ftune.train import checkpoint, distributed, stopping
from ftune.train.heads import WithScalarHead, unwrap_head
from ftune.train.metrics import MetricsLog
from ftune.train.objectives import Objective


def total_steps(cfg: TrainConfig, n_samples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps_per_epoch = math.ceil(math.ceil(n_samples / cfg.micro_batch_size) / cfg.grad_accum)
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_all(model: Any, objective: Objective, samples: list[dict], mbs: int, pad_id: int, accelerator: Any
                 ) -> tuple[float, dict[str, float]]:
    """Held-out loss (mean over the objective's units) and the objective's mean metrics."""
    if not samples:
        return float("nan"), {}
    was_training = model.training
    model.eval()
    total, units, sums = 0.0, 0, {}
    with torch.no_grad():
        for i in range(0, len(samples), mbs):
            batch = to_device(objective.collate(samples[i:i + mbs], pad_id), accelerator.device)
            with accelerator.autocast():
                loss_sum, n, metrics = objective.loss(model, batch)
            total, units = total + float(loss_sum), units + n
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    units = max(units, 1)
    return total / units, {key: value / units for key, value in sums.items()}


def evaluate_held_out(parts: "LoopParts", mbs: int) -> tuple[float, dict[str, float]]:
    """The objective's own held-out evaluation (PPO: reward of greedy answers), else the mean loss."""
    if parts.objective.evaluate is not None:
        return parts.objective.evaluate(parts, parts.eval)
    return evaluate_all(parts.model, parts.objective, parts.eval, mbs, parts.pad_id, parts.accelerator)


class DatasetSource:
    """Micro-batches straight from the training samples, in DataOrder."""

    def __init__(self, parts: "LoopParts", cfg: TrainConfig):
        self.parts, self.cfg = parts, cfg
        self.order = DataOrder(len(parts.train), cfg.micro_batch_size, cfg.seed)

    def batches(self, step: int) -> tuple[list[dict], dict[str, float]]:
        first = step * self.cfg.grad_accum
        return [self.parts.objective.collate([self.parts.train[i] for i in self.order.micro(m)], self.parts.pad_id)
                for m in range(first, first + self.cfg.grad_accum)], {}


def clip_groups(model: Any) -> dict[str, list]:
    """Parameters clipped together, by metric name. A separate critic (PPO's value head on detached
    features) is clipped on its own: its gradient is unrelated to the policy's, and in one global
    norm its larger gradient would shrink every policy update."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, WithScalarHead) and not model.trunk_grad:
        head = {id(p) for p in model.head.parameters()}
        return {"grad_norm": [p for p in trainable if id(p) not in head],
                "value_grad_norm": [p for p in trainable if id(p) in head]}
    return {"grad_norm": trainable}


def train_step(model: Any, objective: Objective, batches: list[dict], accelerator: Any, optimizer: Any,
               scheduler: Any, max_grad_norm: float, hooks: StepHooks | None = None, step: int = 0
               ) -> dict[str, float]:
    """One optimiser step over several micro-batches; returns the step's metrics."""
    hooks = hooks or StepHooks()
    # Method hooks see the model their method built, inside a stage's scalar head (rm, ppo).
    inner = unwrap_head(accelerator.unwrap_model(model))
    hooks.before_step(inner, step)
    # The step's target count over ALL micro-batches: with several processes each takes every
    # world-th micro-batch, and its loss is scaled by world because DDP/FSDP average gradients —
    # so the summed gradient is exactly the one-process gradient of the whole step.
    n_targets = sum(objective.count(b) for b in batches)
    rank, world = distributed.rank(), distributed.world()
    mine = batches[rank::world]
    if objective.prepare_step is not None:
        objective.prepare_step(model, mine, accelerator)
    loss_total, sums = 0.0, {}
    for i, batch in enumerate(mine):
        last = i == len(mine) - 1
        # Skip the gradient all-reduce on all but the last micro-batch (a no-op in one process).
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss_sum, _, metrics = objective.loss(model, batch)
                loss = loss_sum * world / n_targets
                extra = hooks.regularizer(inner) if last else None
                if extra is not None:  # once per step, not once per micro-batch
                    loss = loss + extra
            accelerator.backward(loss)
        loss_total += float(loss_sum.detach())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    if world > 1:  # metrics of the whole step, not of this process's share
        keys = sorted(sums)
        totals = torch.tensor([loss_total, *(sums[k] for k in keys)], dtype=torch.float64, device=accelerator.device)
        totals = accelerator.reduce(totals, reduction="sum")
        loss_total, sums = float(totals[0]), {k: float(v) for k, v in zip(keys, totals[1:])}
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    norms = {name: distributed.grad_norm_value(accelerator.clip_grad_norm_(params, clip))
             for name, params in clip_groups(accelerator.unwrap_model(model)).items()}
    if not all(math.isfinite(v) for v in (loss_total, *norms.values())):
        # No update from a NaN/inf step: the caller stops or skips (train.on_nonfinite).
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_total / n_targets, **norms, "nonfinite": 1.0,
                "tokens": int(sum(int(b["num_tokens"]) for b in batches)), "target_tokens": n_targets}
    optimizer.step()
    hooks.after_optimizer_step(inner, step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total / n_targets, **norms,
            "lr": scheduler.get_last_lr()[0], "tokens": int(sum(int(b["num_tokens"]) for b in batches)),
            "target_tokens": n_targets, **{key: value / n_targets for key, value in sums.items()}}


@dataclass
class FitState:
    """Progress that survives a resume (stored in each checkpoint's state.json)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    eval_before: float = float("nan")
    last_eval: float = float("nan")
    eval_metrics_before: dict = field(default_factory=dict)
    objective_state: dict = field(default_factory=dict)
    """What an objective carries from step to step (PPO: the adaptive KL coefficient)."""
    skipped_steps: list = field(default_factory=list)
    """Steps skipped for a non-finite loss or gradient (train.on_nonfinite=skip)."""
    first_step: list = field(default_factory=list)
    """[tokens, seconds] of the run's first step (one-time costs: allocator warm-up, lazy init),
    left out of the steady-state tokens/s in summary.json."""


@dataclass
class LoopParts:
    """What the loop works on, gathered by ftune/train/run.py."""

    model: Any
    objective: Objective
    optimizer: Any
    scheduler: Any
    accelerator: Any
    train: list[dict]
    eval: list[dict]
    pad_id: int
    run_dir: Path
    hooks: StepHooks
    cfg: Any = None
    """The whole FtuneConfig (stages with rollouts read their settings from it)."""
    tokenizer: Any = None
    steps: int = 0
    """Optimiser steps of the run (0: derived from the samples and train settings)."""
    cache: dict = field(default_factory=dict)
    """Objects an objective builds once per run (PPO: the reward function)."""


def fit(parts: LoopParts, cfg: TrainConfig, state: FitState, log: MetricsLog, progress: Any,
        stop_after: int | None = None) -> FitState:
    """Run optimiser steps from state.step to the end (or to `stop_after`, used by tests)."""
    steps = parts.steps or total_steps(cfg, len(parts.train))
    source = (parts.objective.make_source(parts, state) if parts.objective.make_source is not None
              else DatasetSource(parts, cfg))
    per_epoch = math.ceil(len(parts.train) / cfg.micro_batch_size)
    task = progress.add_task("train", total=steps, completed=state.step, loss=float("nan"), tps=0.0)
    parts.model.train()
    with stopping.on_signals() as signals:
        while state.step < steps:
            _one_step(parts, cfg, state, log, progress, task, source, steps, per_epoch)
            if stop_after is not None and state.step >= stop_after:
                break
            if stopping.requested(signals, parts.accelerator):
                save_checkpoint(parts, cfg, state)
                raise stopping.StopRequested(state.step, signals["signal"])
    return state


def _one_step(parts: LoopParts, cfg: TrainConfig, state: FitState, log: MetricsLog, progress: Any, task: Any,
              source: Any, steps: int, per_epoch: int) -> None:
    """One optimiser step with its logging, evaluation and checkpoint."""
    start = time.perf_counter()
    micro_batches, source_metrics = source.batches(state.step)
    batches = [to_device(b, parts.accelerator.device) for b in micro_batches]
    metrics = train_step(parts.model, parts.objective, batches, parts.accelerator, parts.optimizer,
                         parts.scheduler, cfg.max_grad_norm, parts.hooks, state.step)
    if metrics.pop("nonfinite", 0.0):
        where = _rows_of(source, state.step, cfg)
        if cfg.on_nonfinite == "stop":

            raise FtuneError(f"step {state.step + 1}: the loss or gradient norm is not finite "
                             f"(loss {metrics['loss']}, {', '.join(f'{k} {v}' for k, v in metrics.items() if 'norm' in k)})",
                             [f"rows of this step: {where}"],
                             "Lower train.lr, check those rows, or set train.on_nonfinite=skip; resume with "
                             "train.resume=true from the last checkpoint.")
        state.skipped_steps.append(state.step + 1)
        progress.console.print(f"[yellow]warning:[/] step {state.step + 1} skipped: non-finite loss or gradient "
                               f"(rows {where})")
        metrics.update(lr=parts.scheduler.get_last_lr()[0])
        parts.scheduler.step()
    elapsed = time.perf_counter() - start
    state.step += 1
    state.tokens += metrics["tokens"]
    state.train_seconds += elapsed
    if state.step == 1:
        state.first_step = [metrics["tokens"], elapsed]
    record = {"step": state.step, **metrics, **source_metrics, "step_seconds": round(elapsed, 6),
              "tokens_per_s": metrics["tokens"] / elapsed,
              "epoch": state.step * cfg.grad_accum / per_epoch}
    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < steps:
        state.last_eval, eval_metrics = evaluate_held_out(parts, cfg.micro_batch_size)
        record["eval_loss"] = state.last_eval
        record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        progress.console.print(f"step {state.step}: held-out loss {state.last_eval:.4f}"
                               + "".join(f", {k} {v:.3f}" for k, v in eval_metrics.items()))
    if state.step % cfg.log_every == 0 or "eval_loss" in record:
        log.write(record)
    progress.update(task, completed=state.step, loss=metrics["loss"], tps=state.tokens / state.train_seconds)
    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < steps:
        save_checkpoint(parts, cfg, state)


def _rows_of(source: Any, step: int, cfg: TrainConfig) -> str:
    """The training rows (packed rows or samples, by index) of a step, for error messages."""
    order = getattr(source, "order", None)
    if order is None:
        return "(generated rollouts)"
    first = step * cfg.grad_accum
    return ", ".join(str(i) for m in range(first, first + cfg.grad_accum) for i in order.micro(m))


def save_checkpoint(parts: LoopParts, cfg: TrainConfig, state: FitState) -> Path | None:
    model = parts.accelerator.unwrap_model(parts.model)
    return checkpoint.save(parts.run_dir / "checkpoints", state.step, model, parts.optimizer, parts.scheduler,
                           vars(state).copy(), cfg.save_total_limit)
