"""The figures of the README's eval section, on the real default model (CPU, ~15 minutes):

    ftune train recipe=smollm2-lora-sft train.max_steps=30             -> outputs/evaldemo/sft
    ftune train recipe=smollm2-rm model.path=outputs/evaldemo/sft      -> outputs/evaldemo/rm
    ftune eval run=outputs/evaldemo/sft tasks=smol-mc,smol-qa n=16
    ftune merge run=outputs/evaldemo/sft out=outputs/evaldemo/merged
    ftune eval --compare outputs/evaldemo/sft <base model> judge=outputs/evaldemo/rm n=32

Existing runs are reused (delete outputs/evaldemo to start over). Writes docs/eval_results.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ftune.models.load import resolve_model_path
from ftune.models.runs import run_config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "evaldemo"


def ftune(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ftune.cli", *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    common = [f"train.output_dir={OUT}", "train.tensorboard=false"]
    if not (OUT / "sft" / "summary.json").is_file():
        ftune("train", "recipe=smollm2-lora-sft", "train.max_steps=30", "train.run_name=sft", *common)
    if not (OUT / "rm" / "summary.json").is_file():
        ftune("train", "recipe=smollm2-rm", f"model.path={OUT / 'sft'}", "train.run_name=rm", *common)
    times_file = OUT / "timings.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    if not (OUT / "sft" / "eval" / "report.json").is_file() or "eval" not in times:
        times["eval"] = ftune("eval", f"run={OUT / 'sft'}", "tasks=smol-mc,smol-qa", "n=16", "max_new_tokens=64")
        times_file.write_text(json.dumps(times))
    t_eval = times["eval"]
    if not (OUT / "merged" / "config.json").is_file():
        ftune("merge", f"run={OUT / 'sft'}", f"out={OUT / 'merged'}", "--overwrite")

    base = resolve_model_path(run_config(OUT / "sft").model)
    t_cmp = ftune("eval", "--compare", str(OUT / "sft"), str(OUT / "merged"), base, f"judge={OUT / 'rm'}", "n=32",
                  "max_new_tokens=64", f"out={OUT / 'compare'}")
    report = json.loads((OUT / "sft" / "eval" / "report.json").read_text())
    cmp = json.loads((OUT / "compare" / "compare.json").read_text())
    t, b = report["trained"], report["base"]
    lines = ["# ftune eval on the default model", "", "Produced by `python scripts/eval_runs.py` (CPU only).", "",
             f"## `ftune eval run=<30-step SFT run> tasks=smol-mc,smol-qa n=16` ({t_eval:.0f} s)", "",
             "| | trained | base |", "|---|---:|---:|",
             f"| held-out loss | {t['loss']:.3f} | {b['loss']:.3f} |",
             f"| perplexity | {t['perplexity']:.2f} | {b['perplexity']:.2f} |",
             f"| reference answer found (16 prompts) | {t['reference_match']:.2f} | {b['reference_match']:.2f} |"]
    for task, scores in t["benchmarks"].items():
        for metric, value in scores.items():
            lines.append(f"| {task} {metric} | {value:.3f} | {b['benchmarks'][task][metric]:.3f} |")
    probs = lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["problem_counts"].items())) or "none"  # noqa: E731
    lines += ["", f"Answer problems, trained: {probs(t)}; base: {probs(b)}.", "",
              f"## `ftune eval --compare sft merged base judge=<rm run> n=32` ({t_cmp:.0f} s)", "",
              "| model | Elo (95%) | mean reward |", "|---|---:|---:|"]
    for i, name in enumerate(cmp["contestants"]):
        lo, hi = cmp["elo_95"][i]
        lines.append(f"| {name} | {cmp['elo'][i]:.0f} ({lo:.0f}–{hi:.0f}) | {cmp['mean_reward'][i]:.3f} |")
    lines += ["", "Win rates (row vs column): " + "; ".join(
        f"{cmp['contestants'][i]} vs {cmp['contestants'][j]} {cmp['win_rate'][i][j]:.2f}"
        for i in range(len(cmp['contestants'])) for j in range(len(cmp['contestants'])) if i < j)]
    (ROOT / "docs" / "eval_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
