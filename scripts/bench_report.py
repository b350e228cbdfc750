"""bench/results.md from the results dictionary of scripts/bench.py."""

from __future__ import annotations

import time
from pathlib import Path

from bench_workload import Settings, ftune_overrides

# Issue 8's targets for ftune against the baseline.
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_UTILISATION = 3.0, 0.6, 0.40
LOSS_TOLERANCE = 0.02  # |final-loss difference| counted as "equal": bf16 runs differ by rounding alone


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
                return line.split(":", 1)[1].strip() + (f" ({', '.join(extras)})" if extras else "")
    except OSError:
        pass
    return "unknown CPU"


def _g(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _rounds(ratios: list[float] | None) -> str:
    return f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)})" if ratios else ""


def results_table(summary: dict, arms: list[str]) -> list[str]:
    lines = ["| arm | tokens/s (median) | each round | vs baseline | peak memory GiB | vs baseline | "
             "model GFLOP/s | utilisation | final loss | mean loss, last 5 | held-out loss after | first step s | "
             "wall s | other CPU |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        r = summary.get(arm, {})
        if not r.get("runs"):
            lines.append(f"| {arm} | failed | | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {arm} | {r['tokens_per_s']:.1f} | {', '.join(map(str, r['tokens_per_s_each']))} | "
            f"{_g(r.get('speedup_vs_baseline'))}x{_rounds(r.get('speedup_each_round'))} | {r['peak_memory_gib']:.2f} | {_g(r.get('memory_vs_baseline'))}x | "
            f"{r['model_flops_per_s'] / 1e9:.1f} | {100 * r['utilisation']:.1f}% | {r['final_loss']:.4f} | "
            f"{r['mean_loss_last_k']:.4f} | {_g(r.get('eval_loss_after'), 4)} | "
            f"{', '.join(f'{x:.1f}' for x in r['first_step_seconds_each'])} | "
            f"{', '.join(f'{x:.0f}' for x in r['wall_seconds_each'])} | {100 * r['other_cpu']:.0f}% |")
    return [line.replace("| –x |", "| – |") for line in lines]


def targets_section(summary: dict) -> list[str]:
    """Issue 8's targets for each ftune arm. Equal loss: the final training step's loss where the
    arm trains on the baseline's rows, and the held-out loss after the run for every arm."""
    b = summary.get("baseline", {})
    arms = [a for a in ("ftune", "ftune-packed") if summary.get(a, {}).get("runs")]
    if not (b.get("runs") and arms):
        return ["Targets: not checked (an arm failed or was not run)."]

    def cell(value: str, ok: bool | None) -> str:
        return value if ok is None else f"{value} ({'met' if ok else 'not met'})"

    def checks(arm: str) -> list[str]:
        f = summary[arm]
        final_gap = f["final_loss"] - b["final_loss"]
        held_gap = f["eval_loss_after"] - b["eval_loss_after"]
        return [cell(f"{f['speedup_vs_baseline']:.2f}x", f["speedup_vs_baseline"] >= TARGET_SPEEDUP),
                cell(f"{f['memory_vs_baseline']:.2f}x", f["memory_vs_baseline"] <= TARGET_MEMORY),
                cell(f"{final_gap:+.4f}", abs(final_gap) <= LOSS_TOLERANCE) if arm == "ftune" else "– (other batches)",
                cell(f"{held_gap:+.4f}", abs(held_gap) <= LOSS_TOLERANCE),
                cell(f"{100 * f['utilisation']:.1f}%", f["utilisation"] >= TARGET_UTILISATION)]

    names = [f"tokens/s >= {TARGET_SPEEDUP:g}x baseline", f"peak memory <= {TARGET_MEMORY:g}x baseline",
             f"equal loss: final step, gap within {LOSS_TOLERANCE}", f"equal loss: held-out after, gap within {LOSS_TOLERANCE}",
             f"utilisation >= {100 * TARGET_UTILISATION:.0f}%"]
    columns = [checks(a) for a in arms]
    return ["| target | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms),
            *[f"| {name} | " + " | ".join(col[i] for col in columns) + " |" for i, name in enumerate(names)]]


def loss_table(summary: dict, arms: list[str]) -> list[str]:
    ok = [a for a in arms if summary.get(a, {}).get("runs")]
    if not ok:
        return []
    n = max(len(summary[a]["losses"]) for a in ok)
    lines = ["| step | " + " | ".join(ok) + " |", "|---:|" + "---:|" * len(ok)]
    for i in range(n):
        cells = [f"{summary[a]['losses'][i]:.4f}" if i < len(summary[a]["losses"]) else "" for a in ok]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


def flops_section(res: dict) -> list[str]:
    t, shape = res["flop_terms"], res["workload"]["shape"]
    plan = res["plans"].get("ftune") or next(iter(res["plans"].values()))
    tokens = sum(w["tokens"] for w in plan[1:])
    targets = sum(w["targets"] for w in plan[1:])
    return [
        "FLOPs are counted from the rows each step trains on (the same rows for ftune and the baseline),",
        "as the work the training *needs*, whatever an implementation does beyond it:",
        "",
        "    FLOPs(step) = tokens x (4 N_body + 6 N_lora) + targets x 4 V d + pairs x 12 d_q L",
        "",
        f"- N_body = {t['body_params'] / 1e6:.1f} M frozen linear weights of the {shape['layers']} decoder layers: forward 2N",
        "  plus the input gradient 2N (no weight gradient: frozen). Counted for every layer, including the",
        "  first (whose input gradient nothing needs; 1/L of the term).",
        f"- N_lora = {t['lora_params'] / 1e6:.2f} M LoRA weights: forward 2N, input and weight gradients 4N.",
        f"- LM head (tied embedding, V = {shape['vocab']}, d = {shape['hidden']}): forward + input gradient = 4Vd per",
        "  *target* token (a token whose next token carries the loss). Logits at prompt positions are not",
        "  needed for the loss, so an implementation that computes all of them does uncounted work.",
        "- attention: per causal (query, key) pair within a sample, QK^T and PV forward 4 d_q, backward 8 d_q",
        f"  (d_q = {shape['heads']} heads x {shape['head_dim']} = {shape['heads'] * shape['head_dim']}); pairs = sum of n(n+1)/2 over samples",
        "  (block-diagonal for packed rows). Masked-out or padded pairs are not counted.",
        "- not counted: norms, activations, softmax, RoPE, the loss, the optimiser (elementwise, small).",
        "",
        f"Per token: {t['per_token'] / 1e6:.0f} MFLOP; per target: {t['per_target'] / 1e6:.0f} MFLOP; the timed steps of the",
        f"unpacked arms hold {tokens} tokens, {targets} targets ({100 * targets / max(tokens, 1):.0f}%).",
        "Utilisation = model FLOP/s / peak matmul FLOP/s, the peak being the best large square matmul",
        "in the training dtype measured in this invocation (every round; the best round is used).",
    ]


def commands(s: dict) -> list[str]:
    """The `ftune train` line of each ftune arm (scratch output folder left out)."""

    settings = Settings(**{k: v for k, v in s.items() if k in Settings.__dataclass_fields__})
    out = []
    for arm in ("ftune", "ftune-packed"):
        if arm in s["arms"]:
            line = [o for o in ftune_overrides(settings, arm == "ftune-packed") if not o.startswith(("train.output_dir",
                                                                                                       "train.run_name"))]
            out.append(f"- {arm}: `ftune train {' '.join(line)}`")
    return out


def write_report(res: dict) -> str:
    s, summary, peak = res["settings"], res["summary"], res["peak"]
    w = res["workload"]
    arms = s["arms"]
    contention = max((r.get("other_cpu", 0.0) for r in summary.values() if r.get("runs")), default=0.0)
    per_round = ", ".join(f"{p['flops_per_s'] / 1e9:.0f}" for p in peak["per_round"])
    steps_note = (f"{s['steps']} optimiser steps per run, step 1 not timed (one-time costs) on either side; "
                  f"{s['rounds']} rounds, arms alternating (order reversed every round), one process per run.")
    out = [
        "# Benchmark: ftune vs the Hugging Face baseline (transformers + peft + trl SFTTrainer)",
        "",
        f"Made by `scripts/bench.py` (`make bench`) on {res.get('finished') or time.strftime('%Y-%m-%d %H:%M')}, "
        f"{res['total_seconds'] / 60:.1f} min. Machine: {cpu_name()}, {res['machine']['cpu_count']} CPUs, "
        f"torch {res['machine']['torch']} with {res['machine']['torch_threads']} threads"
        + (f", GPU {res['machine']['gpu']}" if res['machine']['gpu'] else "") + f"; device `{s['device']}`.",
        "",
        f"Workload: {w['model']} LoRA SFT (r={w['method']['r']}, alpha={w['method']['alpha']}, "
        f"dropout={w['method']['dropout']}, targets {w['method']['target_modules']}), loss on the answers only, "
        f"{w['precision']} autocast, AdamW lr {w['lr']} {w['scheduler']} (warmup ratio {w['warmup_ratio']}), "
        f"seed {w['seed']}, max_seq_len {s['seq_len']}; {s['batch']} samples x {s['grad_accum']} accumulation per step "
        f"(ftune-packed: {s['packed_batch']} packed rows of {s['seq_len']}). {steps_note}",
        "",
        *commands(s),
        "- baseline: `scripts/bench_baseline.py` (SFTTrainer with the equal settings listed at the end).",
        "",
        "## Results (medians over rounds)",
        "",
        *results_table(summary, arms),
        "",
        f"Peak {peak['dtype']} matmul: **{peak['flops_per_s'] / 1e9:.0f} GFLOP/s** (per round: {per_round}). "
        "tokens/s counts the non-padding tokens of the timed steps; vs baseline: the ratio of the medians, "
        "and in brackets each round's ratio of the two arms' back-to-back runs. Peak memory: the whole process's peak "
        + ("RSS (each run its own process)." if s["device"] == "cpu" else "CUDA memory allocated."),
        "First step s / wall s: every run's untimed first step (one-time costs: "
        + (f"ftune's torch.compile of the decoder layer with hardware.compile={s.get('compile', 'false')}, "
           "from scratch in the first run and from inductor's on-disk cache after it; "
           if s.get("compile", "false") != "false" else "")
        + "the baseline's first forward) and the whole process, model loading and held-out evaluation included.",
        "Other CPU: the share of all cores' time that other processes used during a run (median), "
        + (f"up to {100 * contention:.0f}% here: other work shared the machine and slowed the runs, so treat "
           "the speeds as rough." if contention > 0.05 else "under 5% here: the machine was otherwise quiet."),
        "",
        "## Targets (issue 8)",
        "",
        *targets_section(summary),
        "",
        "## Training loss per step (first round)",
        "",
        "ftune and baseline train on the same rows in the same steps (ftune's seeded order); the ftune-packed",
        "arm trains on the same samples packed into rows, so its steps hold other samples: compare its mean",
        "and held-out losses, not step by step.",
        "",
        *loss_table(summary, arms),
        "",
        "## FLOP count",
        "",
        *flops_section(res),
        "",
        "## What is equal and what is not",
        "",
        "Equal on both sides: the model folder (ftune's fp32 safetensors conversion of the shipped GGUF),",
        "the tokenised rows and loss mask (ftune's data pipeline; SFTTrainer takes pre-tokenised",
        "`input_ids` + `labels` and uses the labels as they are), the rows of every step (ftune's seeded",
        "order, fed to the Trainer with `train_sampling_strategy=\"sequential\"`), micro-batch, accumulation,",
        "LoRA settings, AdamW hyper-parameters, clipping at 1.0, cosine schedule and warmup steps,",
        "bf16 autocast, no gradient checkpointing (SFTConfig's default is on; set off to match ftune).",
        "",
        "Left as each side does it by default, and so part of what is measured:",
        "- weights: ftune keeps the frozen base in bf16; trl loads it in fp32 and autocast casts per matmul.",
        "- LM head: both project only the target positions; trl's fused head, ftune's chunked head with",
        "  the loss gradient computed in the forward pass (log-softmax in fp32).",
        "- optimiser: torch's fused AdamW on both sides (the Trainer's default; ftune's wherever it fits).",
        "- padding: SFTTrainer pads to the longest row of the micro-batch, ftune to a multiple of 8.",
        "- the baseline also computes trl's per-step entropy and token accuracy (its default logging).",
        "",
        "Raw numbers (every run, step times, losses, the rows of every step): `bench/results.json`.",
        "Where ftune's step spends its time, and the levers tried: `bench/profile.md`.",
        "",
    ]
    return "\n".join(out)
