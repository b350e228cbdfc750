"""`ftune eval --compare runA runB [runC …] judge=<rm run>`: which model answers better?

Every contestant (a run directory or a model folder) answers the same held-out prompts greedily
(the first run's split, or dataset=…), one model in memory at a time. A reward model run (stage=rm)
scores every answer. For each pair and prompt the higher score wins (a difference under `tie`
is a tie, worth half); the report gives pairwise win rates and Elo-style ratings: a Bradley-Terry
fit of all pairwise outcomes, on the Elo scale (400 points = 10:1 odds, mean 1000), with a 95%
interval from resampling the prompts.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from ftune import runtime
from ftune.errors import FtuneError
from ftune.eval.report import generations, held_out
from ftune.methods.runs import load_model, load_run
from ftune.models.runs import is_run_dir, run_config
from ftune.train.api import RewardModelScores, make_accelerator


def outcomes(scores: list[list[float]], tie: float) -> list[list[float]]:
    """wins[i][j]: points of contestant i against j over all prompts (win 1, tie 0.5)."""
    k = len(scores)
    wins = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            if i != j:
                wins[i][j] = sum(1.0 if a - b > tie else 0.5 if abs(a - b) <= tie else 0.0
                                 for a, b in zip(scores[i], scores[j]))
    return wins


def bradley_terry(wins: list[list[float]], prior: float = 0.5, iters: int = 500) -> list[float]:
    """Elo-scale ratings (mean 1000) maximising the Bradley-Terry likelihood of `wins`.

    `prior` adds that many virtual ties to every pair, so a contestant that won everything gets a
    large finite rating instead of infinity. Solved by the standard minorise-maximise update
    p_i <- W_i / sum_j n_ij / (p_i + p_j)."""
    k = len(wins)
    w = [[wins[i][j] + (prior if i != j else 0.0) for j in range(k)] for i in range(k)]
    p = [1.0] * k
    for _ in range(iters):
        new = []
        for i in range(k):
            denom = sum((w[i][j] + w[j][i]) / (p[i] + p[j]) for j in range(k) if j != i)
            new.append(sum(w[i]) / denom if denom else p[i])
        mean_log = sum(math.log(x) for x in new) / k
        p = [x / math.exp(mean_log) for x in new]  # fix the scale: geometric mean 1
    return [1000 + 400 * math.log10(x) for x in p]


def intervals(scores: list[list[float]], tie: float, rounds: int = 200, seed: int = 0) -> list[tuple[float, float]]:
    """95% intervals of each rating, resampling prompts with replacement."""
    rng = random.Random(seed)
    n, samples = len(scores[0]), []
    for _ in range(rounds):
        pick = [rng.randrange(n) for _ in range(n)]
        samples.append(bradley_terry(outcomes([[s[i] for i in pick] for s in scores], tie)))
    out = []
    for c in range(len(scores)):
        values = sorted(r[c] for r in samples)
        out.append((values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]))
    return out


def _answers(entry: str, cfg: Any, prompts: list, max_new: int, device: torch.device) -> list[dict]:
    """Greedy answers of one contestant (a run with its method, or a model folder)."""
    if is_run_dir(entry):
        own = run_config(Path(entry))
        if not own.stage.answers:
            raise FtuneError(f"--compare: {entry} is a reward model run; it can judge (judge=…), not answer")
        model, tokenizer, _ = load_run(Path(entry), device)
    else:


        if not Path(entry).exists():
            raise FtuneError(f"--compare: {entry} is neither a run directory nor a model path")
        own = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=entry))
        merged = Path(entry) / "ftune_merge.json"
        if merged.is_file():  # a merged run renders prompts with the template it was trained with
            template = json.loads(merged.read_text()).get("template", cfg.dataset.template)
            own = dataclasses.replace(own, dataset=dataclasses.replace(own.dataset, template=template))
        model, tokenizer = load_model(own, device)
    gens = generations(model, tokenizer, own, prompts, max_new, make_accelerator(own, device))
    del model
    gc.collect()
    return gens


def compare(entries: list[str], judge: str, n_prompts: int = 32, max_new: int = 128, tie: float = 0.0,
            out: str | None = None) -> dict:
    """Answer, judge, rate; writes <out>/compare.md and compare.json and returns the report."""
    if len(entries) < 2:
        raise FtuneError("--compare needs at least two runs or models", hint="ftune eval --compare runA runB judge=<rm run>")
    if not judge:
        raise FtuneError("--compare needs judge=<reward model run dir>", hint="Train one with: ftune train recipe=smollm2-rm")
    first = next((e for e in entries if is_run_dir(e)), None)
    if first is None:
        raise FtuneError("--compare: at least one contestant must be a run directory (its held-out split gives the prompts)")
    cfg = run_config(Path(first))
    _, prompts = held_out(cfg, n_prompts)
    if not prompts:
        raise FtuneError(f"--compare: {first} has no held-out prompts", hint="Use a run whose dataset has a held-out split.")
    device = runtime.pick_device(cfg)
    RewardModelScores.check(judge)  # a wrong judge fails before any answer is generated
    answers = [_answers(e, cfg, prompts, max_new, device) for e in entries]
    scorer = RewardModelScores(judge, device, cfg.hardware.precision)
    scores = [scorer([g["messages"] for g in gens], [g["answer"] for g in gens], [None] * len(gens)) for gens in answers]
    del scorer
    wins = outcomes(scores, tie)
    n = len(prompts)
    ratings = bradley_terry(wins)
    spans = intervals(scores, tie)
    names = _names(entries)
    report = {"contestants": names, "paths": entries, "judge": judge, "prompts": n, "tie": tie,
              "mean_reward": [sum(s) / n for s in scores],
              "win_rate": [[wins[i][j] / n if i != j else None for j in range(len(entries))] for i in range(len(entries))],
              "elo": ratings, "elo_95": spans,
              "answers": [{"prompt": prompts[p][0][-1]["content"],
                           **{names[c]: {"answer": answers[c][p]["answer"], "reward": scores[c][p]} for c in range(len(entries))}}
                          for p in range(n)]}
    folder = Path(out) if out else Path("outputs") / ("compare-" + "-vs-".join(names))[:120]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (folder / "compare.md").write_text(markdown(report))
    report["out"] = str(folder)
    return report


def _names(entries: list[str]) -> list[str]:
    names = [Path(e).name or e for e in entries]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def markdown(r: dict) -> str:
    names, k = r["contestants"], len(r["contestants"])
    order = sorted(range(k), key=lambda i: -r["elo"][i])
    lines = [f"# Comparison judged by {r['judge']}", "", f"{r['prompts']} held-out prompts, greedy answers; "
             f"a reward difference of at most {r['tie']} counts as a tie.", "",
             "| rank | model | Elo (95% interval) | mean reward |", "|---:|---|---:|---:|"]
    for rank, i in enumerate(order, 1):
        lo, hi = r["elo_95"][i]
        lines.append(f"| {rank} | {names[i]} | {r['elo'][i]:.0f} ({lo:.0f}–{hi:.0f}) | {r['mean_reward'][i]:.3f} |")
    lines += ["", "Win rate of the row against the column (ties count half):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * k]
    for i in range(k):
        cells = ["—" if j == i else f"{r['win_rate'][i][j]:.2f}" for j in range(k)]
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    lines += ["", "## First answers", ""]
    for a in r["answers"][:5]:
        lines.append(f"- Q: {a['prompt'][:120]!r}")
        lines += [f"  - {n}: {a[n]['answer'][:160]!r} (reward {a[n]['reward']:.2f})" for n in names]
    return "\n".join(lines) + "\n"
