"""Settings a user can change without touching ftune's code, measured on the benchmark's ftune arm.

    .venv/bin/python scripts/bench_levers.py                 # every lever, one run each
    .venv/bin/python scripts/bench_levers.py packed threads1 # some of them
    .venv/bin/python scripts/bench_levers.py --out=bench/levers-checkpointing.json \
        rows8x512 rows8x512-recompute-15-layers rows8x512-recompute-all-layers \
        rows8x512 rows8x512-recompute-15-layers rows8x512-recompute-all-layers   # twice each

Each lever is `ftune train` with the bench's ftune-arm overrides plus its own (or an environment
variable), in its own process; the reference (the bench's ftune arm) runs before the first lever
and after every few, so drift shows. Writes bench/levers.json (named levers only:
bench/levers-<names>.json) and prints a table: steady-state
tokens/s (step 1 not timed), peak RSS, final and mean training loss, other processes' CPU share.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench_workload import Settings, median

from bench import ROOT, run_ftune

# name -> (extra overrides, extra environment, packed rows?)
LEVERS: dict[str, tuple[list[str], dict, bool]] = {
    "reference": ([], {}, False),
    "packed": ([], {}, True),  # the recipe as shipped: 2 packed rows of 256
    "packed-mbs4": (["train.micro_batch_size=4"], {}, True),
    "packed-seq512-mbs1": (["dataset.max_seq_len=512", "train.micro_batch_size=1"], {}, True),
    "batch16": (["train.micro_batch_size=16"], {}, False),
    "batch4": (["train.micro_batch_size=4"], {}, False),
    "fp32": (["hardware.precision=fp32"], {}, False),
    "fp32-weights-bf16-autocast": (["model.dtype=float32"], {}, False),
    "threads1": (["hardware.threads=1"], {}, False),
    "eager-attention": (["model.attn_implementation=eager"], {}, False),
    # Gradient checkpointing where activations matter: 8 packed rows of 512 (4,096 tokens per step).
    "rows8x512": (["dataset.max_seq_len=512", "train.micro_batch_size=8"], {}, True),
    "rows8x512-recompute-15-layers": (["dataset.max_seq_len=512", "train.micro_batch_size=8",
                                       "train.gradient_checkpointing=15"], {}, True),
    "rows8x512-recompute-all-layers": (["dataset.max_seq_len=512", "train.micro_batch_size=8",
                                        "train.gradient_checkpointing=true"], {}, True),
}
REFERENCE_EVERY = 3


def steady(result: dict) -> dict:
    """tokens/s over steps 2.. from ftune's own per-step log, plus the other numbers reported."""
    if "error" in result:
        return {"error": result["error"]}
    tokens, seconds = result["step_tokens_logged"][1:], result["step_seconds"][1:]
    losses = result["losses"]
    return {"tokens_per_s": sum(tokens) / sum(seconds), "peak_rss_gib": result["peak_rss_gib"],
            "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses), "eval_loss_after": result["eval_loss_after"],
            "other_cpu": result["other_cpu"], "tokens_per_step": sum(tokens) / len(tokens)}


def main(names: list[str], out_file: str | None = None) -> None:
    s = Settings(steps=12)
    work = Path(tempfile.mkdtemp(prefix="ftune-levers-"))
    chosen = [n for n in (names or list(LEVERS)) if n != "reference"]
    order = ["reference"]
    for i, name in enumerate(chosen, 1):
        order.append(name)
        if i % REFERENCE_EVERY == 0 or i == len(chosen):
            order.append("reference")
    results: dict[str, list[dict]] = {}
    for i, name in enumerate(order):
        extra, env, packed = LEVERS[name]
        row = steady(run_ftune(s, packed, work, f"{i:02d}-{name}", extra, env))
        results.setdefault(name, []).append(row)
        print(f"{name:28s} " + (row["error"] if "error" in row else
              f"{row['tokens_per_s']:7.1f} tok/s  {row['tokens_per_step']:6.0f} tok/step  peak {row['peak_rss_gib']:.2f} GiB  "
              f"loss {row['final_loss']:.4f} (mean {row['mean_loss']:.4f}, held-out {row['eval_loss_after']:.4f})  "
              f"other CPU {100 * row['other_cpu']:.0f}%"), flush=True)
    ref = median([r["tokens_per_s"] for r in results["reference"] if "error" not in r])
    table = {name: {"runs": rows, "tokens_per_s": median([r["tokens_per_s"] for r in rows if "error" not in r]),
                    "vs_reference": median([r["tokens_per_s"] for r in rows if "error" not in r]) / ref,
                    "overrides": LEVERS[name][0], "env": LEVERS[name][1], "packed": LEVERS[name][2]}
             for name, rows in results.items()}
    # Some levers only: their own file, so the full table in levers.json stays whole.
    out = Path(out_file) if out_file else ROOT / "bench" / (
        "levers.json" if not names else f"levers-{'-'.join(dict.fromkeys(chosen))}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(s), "levers": table}, indent=2) + "\n")
    print(f"reference {ref:.1f} tok/s; " + ", ".join(f"{k} {v['vs_reference']:.2f}x" for k, v in table.items()))


if __name__ == "__main__":
    args = sys.argv[1:]
    main([a for a in args if not a.startswith("--out=")],
         next((a.removeprefix("--out=") for a in args if a.startswith("--out=")), None))
