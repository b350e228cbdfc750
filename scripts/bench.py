"""Benchmark: ftune's trainer against the Hugging Face baseline (transformers + peft + trl's
SFTTrainer) on the same workload, in one invocation. Writes bench/results.md and bench/results.json.

    .venv/bin/python scripts/bench.py                      # CPU defaults (~10 min on 2 cores)
    .venv/bin/python scripts/bench.py --steps 20 --rounds 3
    .venv/bin/python scripts/bench.py --device cuda        # GPU settings (bigger batch, more steps)
    make bench-speed                                       # installs the bench extra (trl), then the CPU run
    make bench                                             # this and the accuracy arm (scripts/bench_accuracy.py)

Workload: the default recipe (SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, SFT with the
loss on the answers, the shipped instruction set), bf16 autocast. Arms:
- ftune: `ftune train` with the recipe, unpacked samples (`dataset.packing=false`) so that its
  steps hold exactly the baseline's rows;
- baseline: SFTTrainer fed the same tokenised rows in the same order (scripts/bench_baseline.py);
- ftune-packed: `ftune train` as the recipe ships it (packed rows), same samples, other batches.

Each measured run is its own process (peak memory per run; nothing warm carries over), and the
arms alternate within a round in an order that reverses every round, so slow drift of the machine
(other jobs, heat) falls on every arm alike. Medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_baseline import run
from bench_report import write_report
from bench_workload import (
    ModelShape,
    Settings,
    compose_arm,
    flop_terms,
    ftune_overrides,
    load_samples,
    lora_targets,
    median,
    model_folder,
    peak_matmul_flops,
    step_flops,
    step_rows,
    step_work,
)

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "  # the line a worker prints its measurements on
LAST_K = 5  # training loss is also compared as the mean over the last K steps (one step is noisy)
DEFAULTS = {"cpu": dict(steps=16, rounds=3, batch=8, packed_batch=2),
            "cuda": dict(steps=60, rounds=3, batch=32, packed_batch=8)}


# ----------------------------------------------------------------------------- running arms
@dataclass
class ProcessRun:
    code: int
    peak_rss_gib: float
    wall_seconds: float
    stdout: str
    other_cpu: float
    """CPU time other processes used during the run, as a fraction of all cores' time: the
    contention the run saw (0 on a quiet machine)."""


def busy_cpu_seconds() -> float:
    """Busy time of all CPUs since boot (/proc/stat); nan where there is no /proc."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_process(cmd: list[str], log: Path, timeout_s: int, extra_env: dict | None = None) -> ProcessRun:
    """One child process with its own peak RSS (os.wait4 returns this child's rusage, so runs never
    share a peak) and the CPU time the rest of the machine used meanwhile."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    start, busy_start = time.perf_counter(), busy_cpu_seconds()
    with log.open("w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        out.seek(0)
        stdout = out.read()
    wall = time.perf_counter() - start
    others = busy_cpu_seconds() - busy_start - (usage.ru_utime + usage.ru_stime)
    with log.open("a") as err:
        err.write("\n--- stdout ---\n" + stdout)
    return ProcessRun(os.waitstatus_to_exitcode(status), usage.ru_maxrss / 2**20, wall, stdout,
                      max(0.0, others) / (wall * (os.cpu_count() or 1)))


def run_ftune(s: Settings, packed: bool, work: Path, name: str, extra: list[str] | None = None,
              env: dict | None = None) -> dict:
    """`ftune train` in its own process, then its run directory read back. `extra`: more overrides."""
    cmd = [sys.executable, "-m", "ftune.cli", "train", *ftune_overrides(s, packed, str(work), name), *(extra or [])]
    proc = run_process(cmd, work / f"{name}.log", s.timeout_s, env)
    if proc.code != 0:
        return {"error": f"ftune train exited {proc.code}; log: {work / f'{name}.log'}"}
    run_dir = work / name
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    result = {
        # ftune logs tokens and tokens/s per step; their ratio is the step's own time (batch
        # fetch + forward/backward + optimiser, as timed by ftune's loop).
        "step_seconds": [r["tokens"] / r["tokens_per_s"] for r in steps],
        "step_tokens_logged": [r["tokens"] for r in steps], "losses": [r["loss"] for r in steps],
        "eval_loss_before": summary["eval_loss_before"], "eval_loss_after": summary["eval_loss_after"],
        "peak_gib_self": summary.get("peak_memory_gib"),
        "optimizer": "AdamW (torch, fused where every tensor allows it)",
    }
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    return {**result, "peak_rss_gib": proc.peak_rss_gib, "wall_seconds": proc.wall_seconds, "other_cpu": proc.other_cpu}


def run_baseline(s: Settings, work: Path, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "baseline", "--settings", s.to_json()]
    proc = run_process(cmd, work / f"{name}.log", s.timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.code != 0 or not lines:
        return {"error": f"baseline worker exited {proc.code}; log: {work / f'{name}.log'}"}
    return {**json.loads(lines[-1][len(MARK):]), "peak_rss_gib": proc.peak_rss_gib, "wall_seconds": proc.wall_seconds,
            "other_cpu": proc.other_cpu}


def measure(arm: str, s: Settings, work: Path, name: str, plan: list, terms: dict) -> dict:
    """One run of one arm, with tokens/s and FLOP/s over the steady-state steps (all but the first)."""
    result = run_baseline(s, work, name) if arm == "baseline" else run_ftune(s, arm == "ftune-packed", work, name)
    if "error" in result:
        return {"arm": arm, **result}
    times = result["step_seconds"]
    if len(times) != len(plan):
        return {"arm": arm, "error": f"{len(times)} step times for {len(plan)} steps"}
    logged = result.pop("step_tokens_logged", None)
    if logged is not None and logged != [w.tokens for w in plan]:
        return {"arm": arm, "error": "ftune's logged tokens per step differ from the planned rows (data order changed?)"}
    steady = slice(1, None)  # step 1 carries one-time costs (lazy init, allocator growth) on both sides
    seconds = sum(times[steady])
    tokens = sum(w.tokens for w in plan[steady])
    flops = sum(step_flops(w, terms) for w in plan[steady])
    losses = result["losses"]
    # The compared peak: the process's RSS on CPU; CUDA memory allocated (as each side reports it) on GPU.
    memory = result["peak_rss_gib"] if s.device == "cpu" else result["peak_gib_self"]
    return {"arm": arm, **result, "peak_memory_gib": memory, "steady_seconds": seconds, "steady_tokens": tokens,
            "tokens_per_s": tokens / seconds, "model_flops_per_s": flops / seconds,
            "first_step_seconds": times[0], "final_loss": losses[-1],
            "mean_loss_last_k": sum(losses[-LAST_K:]) / len(losses[-LAST_K:]), "mean_loss": sum(losses) / len(losses)}


# ----------------------------------------------------------------------------- the invocation
def plan_arms(s: Settings) -> tuple[dict, dict, dict]:
    """Per arm: the work of every step; the FLOP terms; facts about the workload for the report."""
    cfg = compose_arm(s, packed=False)
    shape = ModelShape.from_folder(model_folder(cfg))
    terms = flop_terms(shape, cfg.method.r, lora_targets(cfg.method.target_modules))
    plans = {}
    for arm in s.arms:
        arm_cfg = compose_arm(s, packed=arm == "ftune-packed")
        rows = load_samples(arm_cfg)[0]
        plans[arm] = step_work(rows, step_rows(len(rows), arm_cfg, s.steps))
    facts = {"model": cfg.model.name, "model_folder": model_folder(cfg), "shape": vars(shape),
             "method": {"name": cfg.method.name, "r": cfg.method.r, "alpha": cfg.method.alpha,
                        "dropout": cfg.method.dropout, "target_modules": list(cfg.method.target_modules)},
             "precision": cfg.hardware.precision, "lr": cfg.train.lr, "scheduler": cfg.train.lr_scheduler,
             "warmup_ratio": cfg.train.warmup_ratio, "seed": cfg.train.seed}
    return plans, terms, facts


def round_order(arms: list[str], r: int) -> list[str]:
    """ABC, CBA, ABC, …: a linear drift over a round pair hits every arm equally."""
    return list(arms) if r % 2 == 0 else list(reversed(arms))


def run_all(s: Settings, work: Path) -> dict:
    plans, terms, facts = plan_arms(s)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(facts["precision"], torch.float32)
    runs, peaks = [], []
    for r in range(s.rounds):
        # The peak is measured every round: under contention it drops along with the arms.
        peaks.append(peak_matmul_flops(s.device, dtype))
        print(f"round {r + 1}/{s.rounds}: peak {peaks[-1]['flops_per_s'] / 1e9:.0f} GFLOP/s", flush=True)
        for arm in round_order(s.arms, r):
            result = {"round": r + 1, **measure(arm, s, work, f"r{r + 1}-{arm}", plans[arm], terms)}
            runs.append(result)
            print(f"  {arm:13s} " + (result["error"] if "error" in result else
                  f"{result['tokens_per_s']:7.1f} tok/s  peak {result['peak_memory_gib']:.2f} GiB  "
                  f"final loss {result['final_loss']:.4f}  wall {result['wall_seconds']:.0f} s  "
                  f"other CPU {100 * result['other_cpu']:.0f}%"), flush=True)
    peak = max(p["flops_per_s"] for p in peaks)
    return {"settings": vars(s) | {"workdir": str(work)}, "workload": facts, "flop_terms": terms,
            "plans": {arm: [vars(w) for w in plan] for arm, plan in plans.items()},
            "peak": {"dtype": str(dtype).removeprefix("torch."), "flops_per_s": peak, "per_round": peaks},
            "runs": runs, "summary": summarise(runs, s.arms, peak), "machine": machine()}


def summarise(runs: list[dict], arms: list[str], peak: float) -> dict:
    """Medians over the rounds per arm, and ftune's ratios to the baseline."""
    out = {}
    for arm in arms:
        ok = [r for r in runs if r["arm"] == arm and "error" not in r]
        if not ok:
            out[arm] = {"runs": 0}
            continue
        pick = {k: median([r[k] for r in ok]) for k in ("tokens_per_s", "peak_memory_gib", "peak_rss_gib", "model_flops_per_s",
                                                        "first_step_seconds", "wall_seconds", "other_cpu")}
        first = ok[0]
        out[arm] = {**pick, "runs": len(ok), "utilisation": pick["model_flops_per_s"] / peak,
                    "tokens_per_s_each": [round(r["tokens_per_s"], 1) for r in ok],
                    "first_step_seconds_each": [r["first_step_seconds"] for r in ok],
                    "wall_seconds_each": [r["wall_seconds"] for r in ok],
                    "peak_gib_self": median([r.get("peak_gib_self") for r in ok]),
                    "final_loss": first["final_loss"], "mean_loss_last_k": first["mean_loss_last_k"],
                    "mean_loss": first["mean_loss"], "eval_loss_after": first.get("eval_loss_after"),
                    "loss_spread_over_rounds": max(r["final_loss"] for r in ok) - min(r["final_loss"] for r in ok),
                    "losses": first["losses"]}
    base = out.get("baseline", {})
    for arm, row in out.items():
        if arm != "baseline" and row.get("runs") and base.get("runs"):
            row["speedup_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["speedup_each_round"] = paired_ratios(runs, arm)
            row["memory_vs_baseline"] = row["peak_memory_gib"] / base["peak_memory_gib"]
    return out


def paired_ratios(runs: list[dict], arm: str) -> list[float]:
    """tokens/s of `arm` over the baseline's in the same round. The arms of a round run back to
    back, so a slow or fast spell of the machine moves both: their ratio shows the drift the
    medians of each arm leave in."""
    by_round = {}
    for r in runs:
        if "error" not in r and r["arm"] in (arm, "baseline"):
            by_round.setdefault(r["round"], {})[r["arm"]] = r["tokens_per_s"]
    return [round(v[arm] / v["baseline"], 2) for _, v in sorted(by_round.items()) if len(v) == 2]


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_end": os.getloadavg()}


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, help="optimiser steps per run (step 1 is not timed)")
    p.add_argument("--rounds", type=int, help="rounds; each runs every arm once")
    p.add_argument("--seq-len", type=int, default=256, help="dataset.max_seq_len (packed row length)")
    p.add_argument("--batch", type=int, help="samples per micro-batch, both sides")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--packed-batch", type=int, help="packed rows per micro-batch of the ftune-packed arm")
    p.add_argument("--arms", default="ftune,baseline,ftune-packed", help="comma-separated: ftune,baseline,ftune-packed")
    p.add_argument("--compile", choices=["true", "false", "auto"], default="true",
                   help="hardware.compile of the ftune arms (true: a long run's steady state)")
    p.add_argument("--timeout", type=int, default=420, help="seconds one run may take before it is killed")
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="folder for results.md and results.json")
    p.add_argument("--workdir", default="", help="scratch folder for run directories and logs (default: a temp dir)")
    p.add_argument("--worker", choices=["baseline"], help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.settings:
        return args, Settings.from_json(args.settings)
    d = DEFAULTS[args.device]
    s = Settings(device=args.device, steps=args.steps or d["steps"], rounds=args.rounds or d["rounds"],
                 seq_len=args.seq_len, batch=args.batch or d["batch"], grad_accum=args.grad_accum,
                 packed_batch=args.packed_batch or d["packed_batch"], arms=args.arms.split(","),
                 compile=args.compile, timeout_s=args.timeout, workdir=args.workdir)
    unknown = set(s.arms) - {"ftune", "baseline", "ftune-packed"}
    if unknown or s.steps < 2:
        p.error(f"unknown arms {sorted(unknown)}" if unknown else "--steps must be >= 2 (step 1 is not timed)")
    return args, s


def main(argv: list[str] | None = None) -> None:
    args, s = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker == "baseline":

        print(MARK + json.dumps(run(s)), flush=True)
        return
    work = Path(s.workdir or tempfile.mkdtemp(prefix="ftune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench: {s.rounds} rounds x {s.arms}, {s.steps} steps, batch {s.batch} x {s.grad_accum}, "
          f"seq {s.seq_len}, device {s.device}; logs in {work}", flush=True)
    start = time.perf_counter()
    results = run_all(s, work)
    results["total_seconds"] = time.perf_counter() - start
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(write_report(results))
    print(f"wrote {args.out / 'results.md'} and results.json in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
