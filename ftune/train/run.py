"""`ftune train`, top to bottom: start, load the inputs, build the parts, fit, finish.

    start: seed, device, accelerator, run dir -> inputs: model + tokenizer, data
    -> parts: method, compile, the stage's preparation and head, optimiser -> held-out loss before
    -> fit -> held-out loss after -> save -> sample answer -> summary

No stage or method is named here: what differs between them comes from their specs
(ftune.train.objectives.StageSpec, ftune.methods.MethodSpec) and their schemas' facts.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ftune import runtime, safety
from ftune.config.compose import Composed
from ftune.config.schema import FtuneConfig
from ftune.data import templates
from ftune.data.build import build as build_data
from ftune.data.notes import data_report
from ftune.errors import FtuneError
from ftune.methods import Setup, count_parameters, hooks_for
from ftune.methods import apply as apply_method
from ftune.methods.fused_lora import fuse_lora_layers
from ftune.methods.peft_methods import keep_activation_dtype
from ftune.methods.runs import load_model
from ftune.methods.saving import save_trained
from ftune.train import checkpoint, checkpointing, compiled, distributed, objectives, stopping
from ftune.train.heads import WithScalarHead, save_head, unwrap_head
from ftune.train.metrics import MetricsLog, plot_loss
from ftune.train.optim import build_optimizer, build_scheduler
from ftune.train.rundir import fresh_run_dir, resolve_run_dir, resume_command  # noqa: F401 (fresh_run_dir: tests)
from ftune.train.trainer import FitState, LoopParts, evaluate_held_out, fit, save_checkpoint, total_steps

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
# Held-out metrics printed beside the loss (preference stages, reward models, PPO).
SHOWN_METRICS = ("accuracy", "margin", "logp_accuracy", "reward", "kl", "logratio", "response_length")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(cfg: FtuneConfig, device: torch.device) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may train several times (tests, notebooks): start from a clean state each time.
    AcceleratorState._reset_state(reset_partial_state=True)
    if cfg.hardware.strategy == "deepspeed" and distributed.world() > 1:
        # DeepSpeed steps its optimiser inside backward and scales by its own accumulation count;
        # ftune's loop (each process's share of a step, token-weighted) has not been run under it
        # on GPUs yet, so it refuses rather than train with unverified gradients.
        raise FtuneError("training under DeepSpeed is not enabled in this release",
                         ["the deepspeed profiles compose and validate, and --print-launch shows their command"],
                         "Use hardware=fsdp (FSDP2 shards weights, gradients and optimiser state like ZeRO-3) or "
                         "hardware=fsdp-offload (like ZeRO-3 offload); both are tested.")
    from accelerate.utils import DataLoaderConfiguration

    # split_batches: a training step is one step whatever the process count. (Without it Accelerate
    # assumes each process consumed its own batch and steps the LR schedule once per process.)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=MIXED_PRECISION[cfg.hardware.precision],
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def run_steps(cfg: FtuneConfig, n_samples: int) -> int:
    """Optimiser steps of the run: the stage's own count (PPO: per rollout), else the dataset's."""
    steps = objectives.spec_of(cfg.stage).steps
    return steps(cfg, n_samples) if steps is not None else total_steps(cfg.train, n_samples)


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)


def sample_answer(model: Any, tokenizer: Any, cfg: FtuneConfig, messages: list[dict], accelerator: Any) -> str:
    """Greedy answer to one prompt, to show what the model does now."""
    template = templates.load_template(cfg.dataset.template)
    prompt = templates.render_prompt(messages, template, tokenizer, templates.RenderOptions.of(cfg.dataset))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        out = model.generate(**ids, max_new_tokens=cfg.train.sample_max_new_tokens, do_sample=False,
                             eos_token_id=templates.stop_token_ids(tokenizer, cfg.dataset.template),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@dataclass
class Run:
    """What every phase of a run shares."""

    composed: Composed
    console: Console
    main: bool
    """Rank 0, which alone prints and writes files."""
    device: torch.device
    accelerator: Any
    run_dir: Path
    resume_from: Path | None
    wall_start: float
    notes: list[str] = field(default_factory=list)

    @property
    def cfg(self) -> FtuneConfig:
        return self.composed.cfg


def _from_rank0(values: list) -> list:
    """Rank 0's values on every process (one decision for all)."""
    if distributed.world() == 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values, from_process=0)


def start(composed: Composed, console: Console | None) -> Run:
    """Seed, device and accelerator; the run directory, decided by rank 0 before anything loads
    (a refused one costs no loading)."""
    cfg, main = composed.cfg, distributed.is_main()
    console = console or Console()
    if not main:
        console = Console(quiet=True)
    wall_start = time.perf_counter()
    seed_everything(cfg.train.seed)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    accelerator = make_accelerator(cfg, runtime.pick_device(cfg))
    run_dir, resume_from = _from_rank0(list(resolve_run_dir(cfg) if main else (None, None)))
    for warning in checkpoint.SKIPPED:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"[bold]ftune train[/] recipe={cfg.recipe}  model={cfg.model.name}  method={cfg.method.name}  "
                  f"stage={cfg.stage.name}  device={accelerator.device.type}  precision={cfg.hardware.precision}")
    console.print(f"run directory: {run_dir}")
    return Run(composed, console, main, accelerator.device, accelerator, run_dir, resume_from, wall_start)


def load_inputs(run: Run) -> tuple[Any, Any, Any, int]:
    """(model, tokenizer, data, decoder layers to recompute). Model before data: the tokenizer
    decides the tokens. Data before the method: a data error should not cost the time of building
    adapters. The run directory is created only once both have loaded, so a model or data error
    leaves no half-made run directory behind."""
    cfg, console = run.cfg, run.console
    # auto reads rank 0's free memory before the model is loaded: one decision for all processes
    recompute, note = _from_rank0(list(checkpointing.layers_for_run(cfg) if run.main else (0, None)))
    run.notes += [note] if note else []
    with console.status("loading model"):
        model, tokenizer = load_model(cfg, run.device)
    with console.status("tokenising data"), run.accelerator.main_process_first():  # rank 0 fills the cache
        data = build_data(cfg.dataset, cfg.stage.name, cfg.train.seed, tokenizer, prompts_only=cfg.stage.prompts_only)
    if run.main:
        if run.resume_from is None and cfg.train.overwrite and run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # --overwrite: the old run goes only once the new one has loaded
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # Secrets from the environment (e.g. via ${oc.env:...}) are never written to the run directory.
        (run.run_dir / "config.yaml").write_text(safety.redact(run.composed.to_yaml()))
        (run.run_dir / "command.txt").write_text(safety.redact(shlex.join(["ftune", "train", *run.composed.overrides])) + "\n")
        (run.run_dir / "data_stats.json").write_text(safety.redact(json.dumps(data.stats, indent=2)))
    _report_data(console, data.stats, cfg)
    return model, tokenizer, data, recompute


def build_parts(run: Run, model: Any, tokenizer: Any, data: Any, recompute: int) -> tuple[LoopParts, dict]:
    """The trained model (method, recomputation, kernels, the stage's preparation and head), its
    optimiser and scheduler, prepared by Accelerate; returns the loop's parts and facts for the
    summary (base path, steps, trainable count, recomputed layers)."""
    cfg, console, device = run.cfg, run.console, run.device
    stage = objectives.spec_of(cfg.stage)
    checkpointing.enable(model, recompute)
    steps = run_steps(cfg, len(data.train))
    use_compile, compile_note = runtime.compiles(cfg.hardware, steps, device)
    attention = runtime.compiled_attention(cfg, device) if use_compile else None
    if attention:
        model.set_attn_implementation(attention)
    base_path = model.name_or_path
    setup = Setup(total_steps=steps, model_path=base_path, checkpointed_layers=recompute)
    model = apply_method(model, cfg, setup)
    recompute = checkpointing.restrict(model, recompute)  # after the method: peft/qlora may enable all
    if cfg.hardware.precision in ("bf16", "fp16"):  # autocast casts adapter inputs itself
        keep_activation_dtype(model)
    if cfg.hardware.fused_ops:
        fuse_lora_layers(model)
    if use_compile:
        compiled.compile_layers(model, strict=runtime.tristate(cfg.hardware.compile) == "true")
        setup.notes += [compile_note] if compile_note else []
    if stage.prepare is not None:  # e.g. DPO's reference log-probs, computed once
        with console.status(f"preparing stage={cfg.stage.name}"):
            note = stage.prepare(cfg, model, data, tokenizer.pad_token_id, device, run.accelerator)
        setup.notes += [note] if note else []
    objective = objectives.get(cfg.stage, cfg.dataset, model)
    if objective.wrap_model is not None:  # the stage's scalar head (rm: reward; ppo: value), trained too
        model = objective.wrap_model(model)
    for note in [*run.composed.notes, *run.notes, *setup.notes]:
        console.print(f"[yellow]note:[/] {note}")
    trainable, total = count_parameters(model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    hooks = hooks_for(cfg)
    lr_scale = stage.lr_scale(cfg, hooks.lr_scale) if stage.lr_scale is not None else hooks.lr_scale
    if cfg.hardware.strategy == "fsdp" and distributed.world() > 1:
        # FSDP2 shards before the optimiser exists, so the optimiser holds the shards.
        model = distributed.shard_fsdp(model, cfg.hardware, device)
        optimizer = build_optimizer(model, cfg.train, lr_scale)
        scheduler = build_scheduler(optimizer, cfg.train, steps)
        optimizer, scheduler = run.accelerator.prepare(optimizer, scheduler)
    else:
        optimizer = build_optimizer(model, cfg.train, lr_scale)
        scheduler = build_scheduler(optimizer, cfg.train, steps)
        model, optimizer, scheduler = run.accelerator.prepare(model, optimizer, scheduler)
    parts = LoopParts(model, objective, optimizer, scheduler, run.accelerator, data.train, data.eval,
                      tokenizer.pad_token_id, run.run_dir, hooks, cfg=cfg, tokenizer=tokenizer, steps=steps)
    return parts, {"base_path": base_path, "trainable": trainable, "recompute": recompute}


def begin(run: Run, parts: LoopParts) -> tuple[FitState, MetricsLog]:
    """The state the loop starts from: a checkpoint's, or a fresh one after the held-out loss."""
    cfg, console = run.cfg, run.console
    state = FitState()
    if run.resume_from is not None:
        saved = checkpoint.load(run.resume_from, run.accelerator.unwrap_model(parts.model), parts.optimizer,
                                parts.scheduler, cfg.model.allow_pickle)
        state = FitState(**{k: saved[k] for k in vars(state) if k in saved})
        console.print(f"resumed from {run.resume_from} at step {state.step}")
    else:
        state.eval_before, state.eval_metrics_before = evaluate_held_out(parts, cfg.train.micro_batch_size)
        console.print(f"held-out loss before training: {state.eval_before:.4f}{_fmt(state.eval_metrics_before)}")
    log = MetricsLog(run.run_dir, cfg.train.tensorboard, resume_step=state.step, enabled=run.main)
    if run.resume_from is None:
        log.write({"step": 0, "eval_loss": state.eval_before})
    return state, log


def train(composed: Composed, console: Console | None = None, stop_after: int | None = None) -> dict:
    """Run one training job; returns the summary also written to <run>/summary.json."""
    run = start(composed, console)
    model, tokenizer, data, recompute = load_inputs(run)
    parts, facts = build_parts(run, model, tokenizer, data, recompute)
    state, log = begin(run, parts)
    cfg, steps = run.cfg, parts.steps
    unit = "packed rows" if cfg.dataset.packing else "samples"
    run.console.print(f"training {steps} steps x {cfg.train.grad_accum} x {cfg.train.micro_batch_size} {unit}")
    with progress_bar(run.console) as progress:
        try:
            state = fit(parts, cfg.train, state, log, progress, stop_after=stop_after)
        except stopping.StopRequested as stop:
            log.close()
            command = resume_command(composed, run.run_dir)
            run.console.print(f"[yellow]stopped on {stop.signal_name}[/] after step {stop.step}: checkpoint written.")
            run.console.print(f"resume with: {command}", soft_wrap=True, markup=False, highlight=False)  # one line
            return {"stopped_at": stop.step, "signal": stop.signal_name, "run_dir": str(run.run_dir), "resume": command}
    if state.step < steps:  # stopped early on purpose (stop_after): leave a checkpoint to resume from
        save_checkpoint(parts, cfg.train, state)
        log.close()
        return {"stopped_at": state.step, "run_dir": str(run.run_dir)}
    return finish(run, parts, state, log, data, facts)


def finish(run: Run, parts: LoopParts, state: FitState, log: MetricsLog, data: Any, facts: dict) -> dict:
    """Held-out loss after, the trained output (and the stage's head) saved, the sample answer
    and the summary."""
    cfg, tokenizer = run.cfg, parts.tokenizer
    eval_after, eval_metrics_after = evaluate_held_out(parts, cfg.train.micro_batch_size)
    log.write({"step": state.step, "eval_loss": eval_after, **{f"eval_{k}": v for k, v in eval_metrics_after.items()}})
    log.close()
    unwrapped = run.accelerator.unwrap_model(parts.model)
    trained = unwrap_head(unwrapped)
    method_results = parts.hooks.after_training(trained, lambda: evaluate_held_out(parts, cfg.train.micro_batch_size)[0])
    # Whole tensors (sharded ones gathered by every process), written by rank 0.
    sharded = distributed.is_sharded(unwrapped)
    state_dict = distributed.full_state(trained, trainable_only=not cfg.method.saves_full_model) if sharded else None
    head = unwrapped.head if isinstance(unwrapped, WithScalarHead) else None
    head_state = distributed.full_state(head) if sharded and head is not None else None
    saved_to = run.run_dir / cfg.method.output_name()
    if run.main:
        saved_to = save_trained(trained, tokenizer, cfg.method, facts["base_path"], saved_to, state_dict)
        if head is not None:  # the stage's head (reward or value) beside the trained output
            save_head(head, saved_to, kind=cfg.stage.scalar_head, state=head_state)
        plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    summary = {
        "run_dir": str(run.run_dir), "steps": state.step, "eval_loss_before": state.eval_before,
        "eval_loss_after": eval_after, "bad_rows_skipped": (data.stats.get("bad_rows") or {}).get("skipped", 0),
        "train_tokens": state.tokens, "train_seconds": round(state.train_seconds, 2),
        "tokens_per_s": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        "tokens_per_s_steady": steady_tokens_per_s(state),
        "wall_seconds": round(time.perf_counter() - run.wall_start, 1), "saved": str(saved_to),
        **({"skipped_steps": state.skipped_steps} if state.skipped_steps else {}),
        "trainable_parameters": facts["trainable"], "peak_memory_gib": round(peak_memory_gib(run.device), 3),
        "checkpointed_layers": facts["recompute"], **method_results,
        **({"eval_metrics_before": state.eval_metrics_before, "eval_metrics_after": eval_metrics_after}
           if eval_metrics_after else {}),
    }
    prompts = [[{"role": "user", "content": cfg.dataset.sample_prompt}]] if cfg.dataset.sample_prompt else data.eval_prompts
    if cfg.train.sample_max_new_tokens and prompts and cfg.stage.answers:
        summary["sample_prompt"] = prompts[0][-1]["content"]
        summary["sample_answer"] = sample_answer(unwrapped, tokenizer, cfg, prompts[0], run.accelerator)
    if run.main:
        (run.run_dir / "summary.json").write_text(safety.redact(json.dumps(summary, indent=2)))
    _report_summary(run.console, summary)
    return summary


def steady_tokens_per_s(state: FitState) -> float | None:
    """tokens/s without the first step (its one-time costs: allocator warm-up, lazy init); None
    for one-step runs."""
    if not state.first_step or state.step < 2:
        return None
    tokens, seconds = state.tokens - state.first_step[0], state.train_seconds - state.first_step[1]
    return round(tokens / seconds, 1) if seconds > 0 else None


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: allocated CUDA memory on a GPU, resident set size (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _fmt(metrics: dict) -> str:
    return "".join(f", {k} {v:.3f}" for k, v in metrics.items() if k in SHOWN_METRICS)


def _report_data(console: Console, stats: dict, cfg: FtuneConfig) -> None:
    t = stats["train"]
    packed = f"; packed into {stats['packed_rows']['train']} rows of {cfg.dataset.max_seq_len}" if "packed_rows" in stats else ""
    console.print(f"data: {t['samples']} train samples ({t['tokens']:,} tokens, {t['trained_tokens']:,} trained), "
                  f"{stats['eval']['samples']} held-out" + packed + (" [from cache]" if stats.get("from_cache") else ""))
    for level, line in data_report(stats, cfg.dataset.max_seq_len):
        console.print(f"[yellow]{level}:[/] {escape(line)}", soft_wrap=True)
    bad = stats.get("bad_rows") or {}
    if bad.get("skipped"):
        console.print(f"[yellow]warning:[/] {bad['skipped']} bad rows skipped (dataset.on_bad_row=skip), e.g.:")
        for example in bad["examples"]:
            console.print(f"  - {example}", soft_wrap=True)


def _report_summary(console: Console, s: dict) -> None:
    drop = s["eval_loss_before"] - s["eval_loss_after"]
    better = "[green]lower[/]" if drop > 0 else "[red]not lower[/]"
    ppl = f"ppl {math.exp(s['eval_loss_before']):.2f} -> {math.exp(s['eval_loss_after']):.2f}"
    if "eval_metrics_after" in s:  # preference stages: the loss is not a perplexity
        before, after = s["eval_metrics_before"], s["eval_metrics_after"]
        ppl = ", ".join(f"{k} {before.get(k, float('nan')):.3f} -> {after[k]:.3f}"
                        for k in SHOWN_METRICS if k in after)
    console.print(f"held-out loss: {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f} ({better}, {ppl})")
    console.print(f"{s['train_tokens']:,} tokens in {s['train_seconds']:.0f} s of training = {s['tokens_per_s']:.0f} tokens/s; "
                  f"wall time {s['wall_seconds']:.0f} s")
    if "sample_answer" in s:
        console.print(f"[bold]sample[/] Q: {s['sample_prompt']}\n         A: {s['sample_answer']}")
    if s.get("bad_rows_skipped"):
        console.print(f"[yellow]{s['bad_rows_skipped']} bad data rows were skipped[/] (listed in data_stats.json)")
    console.print(f"saved: {s['saved']}  (metrics.jsonl, loss.png, summary.json in {s['run_dir']})")
