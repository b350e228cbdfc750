"""`ftune eval run=<run dir>`: did the model get better? One report (Markdown + JSON) with

- the stage's held-out loss (and perplexity for pt/sft, accuracy/margins for rm and dpo) of the
  trained model and of its base on the same held-out rows;
- greedy answers to held-out prompts with automatic error analysis: empty answers, answers that
  never end (no end-of-turn token), over-long answers, repetition loops, template text leaking
  into the answer — counts and examples.

The held-out rows are the run's own split (same dataset config and seed), so nothing the run
trained on is evaluated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ftune.errors import FtuneError

LEAKS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "### Instruction",
         "### Response", "<|endoftext|>", "<s>", "</s>", "<|user|>", "<|assistant|>")


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the answer (0: none, near 1: a loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def analyse(answer: str, raw: str, n_tokens: int, ended: bool, max_new: int, reference: str | None,
            tokenizer: Any, tokens: list[int]) -> list[str]:
    """The problems of one answer, by name."""
    problems = []
    if not answer.strip():
        problems.append("empty")
    if not ended:
        problems.append("no_eos")
    ref_len = len(tokenizer(reference, add_special_tokens=False)["input_ids"]) if reference else None
    if (ref_len and n_tokens > 3 * ref_len + 16) or n_tokens >= max_new:
        problems.append("over_long")
    if repetition_rate(tokens) > 0.3:
        problems.append("repetition")
    if any(marker in raw for marker in LEAKS):
        problems.append("template_leak")
    return problems


def generations(model: Any, tokenizer: Any, cfg: Any, prompts: list[tuple[list[dict], str | None]],
                max_new: int, accelerator: Any) -> list[dict]:
    from ftune.data import templates

    template = templates.load_template(cfg.dataset.template)
    stops = templates.stop_token_ids(tokenizer, cfg.dataset.template)
    out = []
    model.eval()
    for messages, reference in prompts:
        text = templates.render_prompt(messages, template, tokenizer)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            gen = model.generate(**ids, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] in stops
        body = new[:-1] if ended else new
        answer = tokenizer.decode(body, skip_special_tokens=True).strip()
        raw = tokenizer.decode(body, skip_special_tokens=False)
        out.append({"prompt": messages[-1]["content"], "answer": answer, "reference": reference,
                    "tokens": len(new), "problems": analyse(answer, raw, len(new), ended, max_new, reference,
                                                            tokenizer, body)})
    return out


def held_out(run_dir: Path, n_prompts: int) -> tuple[Any, list[dict], list[tuple[list[dict], str | None]]]:
    """(the run's config, held-out samples, held-out prompts with their reference answers)."""
    from ftune.data.build import prompt_of, split_records
    from ftune.models.runs import run_config

    cfg = run_config(run_dir)
    _, records = split_records(cfg.dataset, cfg.train.seed)
    prompts = [prompt_of(r) for r in records if "messages" in r][:n_prompts]
    return cfg, records, prompts


def evaluate_run(run_dir: str | Path, n_prompts: int = 16, max_new: int = 128) -> dict:
    """Write <run>/eval/report.md and report.json; returns the report."""
    from ftune.data.build import build as build_data
    from ftune.models.runs import load_run
    from ftune.train import objectives
    from ftune.train.run import make_accelerator
    from ftune.train.trainer import evaluate_all

    run_dir = Path(run_dir)
    cfg, _, prompts = held_out(run_dir, n_prompts)
    if cfg.stage.name == "ppo":
        raise FtuneError("ftune eval: PPO runs report their held-out reward in summary.json (eval_metrics_after); "
                         "evaluate the policy's answers with ftune eval after merging it (model=…) — not built yet")
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    accelerator = make_accelerator(cfg, device)
    model, tokenizer, _ = load_run(run_dir, device)
    if cfg.stage.name == "rm":
        from ftune.models.runs import trained_folder
        from ftune.train.heads import WithScalarHead, load_head

        model = WithScalarHead(model)
        load_head(model, trained_folder(run_dir, cfg))
    data = build_data(cfg.dataset, cfg.stage.name, cfg.train.seed, tokenizer)
    objective = objectives.get(cfg.stage)
    mbs, pad = cfg.train.micro_batch_size, tokenizer.pad_token_id
    trained = evaluate_all(model, objective, data.eval, mbs, pad, accelerator)
    base = None
    if hasattr(model, "disable_adapter") and cfg.stage.name in ("pt", "sft"):
        with model.disable_adapter():
            base = evaluate_all(model, objective, data.eval, mbs, pad, accelerator)
    report: dict[str, Any] = {"run": str(run_dir), "stage": cfg.stage.name, "held_out_rows": len(data.eval),
                              "loss": trained[0], "metrics": trained[1]}
    if cfg.stage.name in ("pt", "sft"):
        report["perplexity"] = math.exp(trained[0])
    if base is not None:
        report.update(base_loss=base[0], base_perplexity=math.exp(base[0]))
    if cfg.stage.name in ("pt", "sft", "dpo"):
        gens = generations(model, tokenizer, cfg, prompts, max_new, accelerator)
        counts = {}
        for g in gens:
            for p in g["problems"]:
                counts[p] = counts.get(p, 0) + 1
        from ftune.train.rewards import reference_reward

        with_ref = [g for g in gens if g["reference"]]
        report.update(generations=gens, problem_counts=counts)
        if with_ref:  # the reference answer appears in the answer (case, punctuation, spaces ignored)
            report["reference_match"] = sum(reference_reward("", g["answer"], g["reference"]) for g in with_ref) / len(with_ref)
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    lines = [f"# Evaluation of {r['run']}", "", f"Stage {r['stage']}, {r['held_out_rows']} held-out rows.", "",
             "| | trained | base |", "|---|---:|---:|",
             f"| held-out loss | {r['loss']:.4f} | {r.get('base_loss', float('nan')):.4f} |"]
    if "perplexity" in r:
        lines.append(f"| perplexity | {r['perplexity']:.3f} | {r.get('base_perplexity', float('nan')):.3f} |")
    lines += [f"| {k} | {v:.4f} | |" for k, v in r["metrics"].items()]
    if "generations" in r:
        n = len(r["generations"])
        match = f"; the reference answer appears in {r['reference_match']:.0%} of them" if "reference_match" in r else ""
        lines += ["", f"## Greedy answers to {n} held-out prompts{match}", "",
                  "Problems: " + (", ".join(f"{k} {v}/{n}" for k, v in sorted(r["problem_counts"].items())) or "none"), ""]
        for g in r["generations"][:8]:
            flag = f" **[{', '.join(g['problems'])}]**" if g["problems"] else ""
            lines += [f"- Q: {g['prompt'][:120]!r}", f"  A: {g['answer'][:200]!r}{flag}"]
    return "\n".join(lines) + "\n"
