"""bench/accuracy.md from the results of scripts/bench_accuracy.py (the measured part; the
findings on the arms' design differences come from scripts/bench_accuracy_checks.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def _lrs_used(logged: list[float]) -> list[float]:
    """ftune logs the scheduler's lr after its step (the next step's lr); trl logs the lr the step
    used. Shifted by one, with the first step's warmup lr (0) in front, they compare."""
    return [0.0, *logged[:-1]]


def write_report(r: dict) -> str:
    st, summ = r["settings"], r["summary"]
    seeds = st.get("seeds_done", st["seeds"])
    arms = [a for a in ("ftune", "baseline") if a in summ]
    lines = [
        "# Accuracy: ftune vs transformers + peft + trl SFTTrainer",
        "",
        f"Made by `scripts/bench_accuracy.py` ({r.get('finished', '')}, {r.get('total_seconds', 0) / 60:.0f} min). "
        f"Task: JSON extraction of header fields from real Python package METADATA text "
        f"({r['data']['train_prompts']} train prompts from {r['data']['train_distributions']} distributions, "
        f"{r['data']['test_prompts']} test prompts from {r['data']['test_distributions']} other distributions; "
        f"{st['test_n']} test prompts scored). SmolLM2-135M-Instruct, LoRA r=16 all linear, "
        f"{st['steps']} steps x {st['batch']} x {st['grad_accum']} samples, lr {st['lr']:g} cosine (5% warmup), bf16, "
        f"seeds {', '.join(map(str, seeds))}. Both adapters scored by the same code: adapter merged into the fp32 "
        f"base, decoded in {st.get('score_dtype', 'float32')}, greedy, max_new_tokens {st['max_new_tokens']}, exact "
        f"match of the parsed JSON; plus the teacher-forced loss of the reference answers (same model, same dtype).",
        "",
        "| seed | " + " | ".join(f"{a} exact" for a in arms) + " | diff (ftune - baseline) | right only in ftune "
        "| right only in baseline | McNemar p | " + " | ".join(f"{a} held-out loss" for a in arms) + " |",
        "|---|" + "---|" * (2 * len(arms) + 4),
    ]
    for i, sd in enumerate(seeds):
        ps = summ["per_seed"].get(str(sd), {})
        lines.append(f"| {sd} | " + " | ".join(_f(summ[a]["exact_match"][i]) for a in arms)
                     + f" | {_f(ps.get('diff'))} | {ps.get('only_ftune', '')} | {ps.get('only_baseline', '')} | "
                     f"{_f(ps.get('mcnemar_p'), 2)} | " + " | ".join(_f(summ[a]["eval_loss_after"][i], 4) for a in arms) + " |")
    pd = summ.get("paired", {})
    lines.append("| mean | " + " | ".join(f"{_f(summ[a]['mean'])} ± {_f(summ[a]['sd'])}" for a in arms)
                 + f" | {_f(pd.get('diff_mean'))} ± {_f(pd.get('diff_sd'))} | {pd.get('only_ftune', '')} | "
                 f"{pd.get('only_baseline', '')} | {_f(pd.get('pooled_sign_test_p'), 2)} (pooled) | |")
    lines += ["", "± is the standard deviation over seeds; min-max: "
              + "; ".join(f"{a} {_f(summ[a]['min'])}-{_f(summ[a]['max'])}" for a in arms) + "."]
    if "base" in r:
        lines.append(f"The untrained base model scores {_f(r['base']['exact_match'])} exact "
                     f"({_f(r['base']['parsed'])} of its answers parse as JSON).")
    same = []
    for sd in seeds:
        run = r["runs"].get(str(sd), {})
        if {"ftune", "baseline"} <= set(run):
            a, b = run["ftune"]["score"]["items"], run["baseline"]["score"]["items"]
            same.append(f"seed {sd} {sum(x['answer'] == y['answer'] for x, y in zip(a, b))} of {len(a)}")
    if same:
        lines.append("Test prompts where both adapters generate the very same text: " + "; ".join(same) + ".")
    lines.append("Field accuracy (share of requested fields right): "
                 + "; ".join(f"{a} {_f(summ[a]['field_accuracy_mean'])}" for a in arms) + ".")
    lines += ["", "## Test-answer loss (teacher-forced, per token; paired per prompt)", "",
              "| seed | ftune | baseline | per-prompt diff ftune - baseline (mean ± 95% CI) | prompts where ftune is lower |",
              "|---|---|---|---|---|"]
    for sd in seeds:
        run = r["runs"].get(str(sd), {})
        if not {"ftune", "baseline"} <= set(run) or "answer_loss" not in run["ftune"]["score"]:
            continue
        a, b = run["ftune"]["score"], run["baseline"]["score"]
        d = [x["nll"] / x["answer_tokens"] - y["nll"] / y["answer_tokens"] for x, y in zip(a["items"], b["items"])]
        m = sum(d) / len(d)
        se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        lines.append(f"| {sd} | {_f(a['answer_loss'], 4)} | {_f(b['answer_loss'], 4)} | {m:+.4f} ± {1.96 * se:.4f} | "
                     f"{sum(x < 0 for x in d)} of {len(d)} |")
    lines += ["", "## Training side by side (same rows, same order)", "",
              "| seed | step-1 loss ftune / baseline | mean step-loss diff (ftune - baseline) | last-5 mean loss "
              "ftune / baseline | max lr diff | mean grad-norm ratio ftune / baseline | train s ftune / baseline |",
              "|---|---|---|---|---|---|---|"]
    for sd in seeds:
        run = r["runs"].get(str(sd), {})
        if not {"ftune", "baseline"} <= set(run):
            continue
        a, b = run["ftune"]["train"], run["baseline"]["train"]
        la, lb = a["losses"], b["losses"]
        n = min(len(la), len(lb))
        lr_diff = max((abs(x - y) for x, y in zip(_lrs_used(a["lrs"]), b["lrs"])), default=float("nan"))
        ratios = [x / y for x, y in zip(a["grad_norms"], b["grad_norms"]) if x and y]
        lines.append(f"| {sd} | {_f(la[0], 4)} / {_f(lb[0], 4)} | {_f(sum(x - y for x, y in zip(la, lb)) / max(n, 1), 4)} | "
                     f"{_f(sum(la[-5:]) / 5, 4)} / {_f(sum(lb[-5:]) / 5, 4)} | {lr_diff:.1e} | "
                     f"{_f(sum(ratios) / max(len(ratios), 1), 3)} | {a['train_seconds']:.0f} / {b['train_seconds']:.0f} |")
    checks = Path(__file__).resolve().parent.parent / "bench" / "accuracy_checks.md"
    if checks.is_file():
        lines += ["", checks.read_text().rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/accuracy.json")
    print(write_report(json.loads(path.read_text())))
