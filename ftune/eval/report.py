"""`ftune eval run=<run dir> | model=<path>`: did the model get better? One report (Markdown + JSON,
plots as PNG) with

- the stage's held-out loss (and perplexity for pt/sft, accuracy/margins for rm and dpo) of the
  trained model and of its base on the same held-out rows;
- greedy answers to held-out prompts with automatic error analysis: empty answers, answers that
  never end (no end-of-turn token), over-long answers, repetition loops, template text leaking
  into the answer — counts and examples, for the trained model and its base;
- PPO runs: the run's own reward of those greedy answers (trained vs base);
- benchmarks through lm-eval-harness (ftune/eval/benchmarks.py), trained vs base.

The held-out rows are the run's own split (same dataset config and seed), so nothing the run
trained on is evaluated. The base is the adapter switched off (peft methods) or the run's starting
model loaded on its own after the trained one is freed (full, freeze, bitfit, ftune's own adapters).
`model=<path>` evaluates any model folder, GGUF file or run directory on a composed dataset
(the recipe's, or dataset=…), with no base.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftune import runtime
from ftune.config.compose import compose
from ftune.data import templates
from ftune.data.build import build as build_data
from ftune.data.build import prompt_of, split_records
from ftune.errors import FtuneError
from ftune.eval import benchmarks
from ftune.eval.plots import summary_plot
from ftune.methods.runs import load_model, load_run
from ftune.models.runs import is_run_dir, run_config, trained_folder
from ftune.train.api import (
    WithScalarHead,
    evaluate_all,
    load_head,
    make_accelerator,
    objective_for,
    reference_reward,
    reward_function,
)

LEAKS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "### Instruction",
         "### Response", "<|endoftext|>", "<s>", "</s>", "<|user|>", "<|assistant|>")


@dataclass
class EvalOptions:
    """What `ftune eval` measures besides held-out loss."""

    n_prompts: int = 16  # held-out prompts answered greedily
    max_new: int = 128  # answer length limit
    benchmarks: tuple[str, ...] = ()  # lm-eval task names (arc, hellaswag, mmlu, truthfulqa, …)
    tasks: tuple[str, ...] = ()  # local task configs (eval_tasks/<name> or a YAML path)
    limit: int | None = None  # rows per benchmark (None: all)
    chat: bool = False  # render benchmark prompts with the chat template
    base: bool = True  # also evaluate the base model
    out: str | None = None  # report folder (default <run>/eval, or eval/<model name>)


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

    template = templates.load_template(cfg.dataset.template)
    stops = templates.stop_token_ids(tokenizer, cfg.dataset.template)
    out = []
    model.eval()
    for messages, reference in prompts:
        text = templates.render_prompt(messages, template, tokenizer, templates.RenderOptions.of(cfg.dataset))
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            gen = model.generate(**ids, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] in stops
        body = new[:-1] if ended else new
        answer = tokenizer.decode(body, skip_special_tokens=True).strip()
        raw = tokenizer.decode(body, skip_special_tokens=False)
        out.append({"prompt": messages[-1]["content"], "messages": messages, "answer": answer, "reference": reference,
                    "tokens": len(new), "problems": analyse(answer, raw, len(new), ended, max_new, reference,
                                                            tokenizer, body)})
    return out


def held_out(cfg: Any, n_prompts: int) -> tuple[list[dict], list[tuple[list[dict], str | None]]]:
    """(held-out records, held-out prompts with their reference answers) of a config's own split."""
    _, records = split_records(cfg.dataset, cfg.train.seed)
    prompts = [prompt_of(r) for r in records if "messages" in r][:n_prompts]
    return records, prompts


@dataclass
class Subject:
    """What is evaluated: a run (with its base) or a plain model path on a composed config."""

    label: str
    cfg: Any
    run_dir: Path | None
    out: Path


def subject(run: str | None, model: str | None, overrides: list[str], out: str | None) -> Subject:
    if bool(run) == bool(model):
        raise FtuneError("ftune eval needs exactly one of run=<run dir> or model=<path>",
                         hint="e.g. ftune eval run=outputs/<run>   or   ftune eval model=merged/<name> dataset=smol-instruct")
    if run:
        run_dir = Path(run)
        if not is_run_dir(run_dir):
            raise FtuneError(f"run: {run_dir} is not a run directory (no config.yaml/command.txt)",
                             hint="Give the directory of a finished `ftune train` run, or use model=<path>.")
        if overrides:
            raise FtuneError(f"ftune eval run=…: config overrides ({' '.join(overrides)}) apply to model=… only",
                             hint="A run is evaluated on its own held-out split with its own config.")
        return Subject(str(run_dir), run_config(run_dir), run_dir, Path(out) if out else run_dir / "eval")

    path = Path(model)
    merge_info = path / "ftune_merge.json"  # a merged folder knows its chat template
    template = json.loads(merge_info.read_text()).get("template") if merge_info.is_file() else None
    extra = [f"dataset.template={template}"] if template and not any(o.startswith("dataset.template") for o in overrides) else []
    # The model is evaluated as it is: no method is applied to it.
    cfg = compose([f"model.path={model}", *extra, *overrides]).cfg
    if not cfg.stage.token_loss:
        raise FtuneError(f"ftune eval model=…: stage={cfg.stage.name} needs a run", hint="Evaluate the run directory instead.")
    name = path.name.removesuffix(".gguf") or "model"
    return Subject(str(model), cfg, None, Path(out) if out else Path("eval") / name)


def load_subject(sub: Subject, device: torch.device) -> tuple[Any, Any]:
    """(trained model, tokenizer): a run with its method applied (not merged, so the base stays
    reachable through disable_adapter), or the plain model."""
    if sub.run_dir is None:
        return load_model(sub.cfg, device)

    model, tokenizer, _ = load_run(sub.run_dir, device)
    if sub.cfg.stage.scalar_head == "reward":  # a reward model is scored through its head

        model = WithScalarHead(model)
        load_head(model, trained_folder(sub.run_dir, sub.cfg))
    return model, tokenizer


def load_base(sub: Subject, device: torch.device) -> Any:
    """The run's starting model on its own (for methods without an adapter switch)."""
    return load_model(sub.cfg, device)[0]  # the saved config: its model.path is where the run started


def _count(gens: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in gens:
        for p in g["problems"]:
            counts[p] = counts.get(p, 0) + 1
    return counts


def measure(model: Any, tokenizer: Any, sub: Subject, data: Any, prompts: list, opts: EvalOptions, plan: Any,
            accelerator: Any, reward: Any) -> dict[str, Any]:
    """Every figure of one model: loss, answers and their problems, reward, benchmarks."""
    cfg, out = sub.cfg, {}
    if not cfg.stage.rewarded and data is not None and data.eval:
        loss, metrics = evaluate_all(model, objective_for(cfg.stage, cfg.dataset, model), data.eval, cfg.train.micro_batch_size,
                                     tokenizer.pad_token_id, accelerator)
        out.update(loss=loss, metrics=metrics)
        if cfg.stage.token_loss:
            out["perplexity"] = math.exp(loss)
    if cfg.stage.answers and prompts:
        gens = generations(model, tokenizer, cfg, prompts, opts.max_new, accelerator)
        out.update(generations=gens, problem_counts=_count(gens))
        with_ref = [g for g in gens if g["reference"]]
        if with_ref:  # the reference answer appears in the answer (case, punctuation, spaces ignored)
            out["reference_match"] = sum(reference_reward("", g["answer"], g["reference"]) for g in with_ref) / len(with_ref)
        if reward is not None:
            scores = reward([g["messages"] for g in gens], [g["answer"] for g in gens], [g["reference"] for g in gens])
            for g, s in zip(gens, scores):
                g["reward"] = float(s)
            out["reward"] = sum(scores) / len(scores)
    if plan is not None and cfg.stage.answers:

        out["benchmarks"] = benchmarks.run(plan, model, tokenizer, cfg.train.micro_batch_size, opts.limit, opts.chat)
    return out


def evaluate(run: str | None = None, model: str | None = None, overrides: list[str] | None = None,
             opts: EvalOptions | None = None) -> dict:
    """Evaluate and write <out>/report.md, report.json and summary.png; returns the report."""
    opts = opts or EvalOptions()
    sub = subject(run, model, list(overrides or []), opts.out)
    cfg, stage = sub.cfg, sub.cfg.stage.name
    plan = benchmarks.prepare(list(opts.benchmarks), list(opts.tasks))  # checked before any model loads
    if plan is not None and not cfg.stage.answers:
        raise FtuneError(f"benchmarks score language models; a stage={stage} run is a reward model",
                         hint="Drop benchmarks=/tasks= for reward models (their report is held-out accuracy).")
    _, prompts = held_out(cfg, opts.n_prompts)
    device = runtime.pick_device(cfg)
    accelerator = make_accelerator(cfg, device)
    reward = None
    if cfg.stage.rewarded:
        reward = reward_function(cfg.stage, device, cfg.hardware.precision)
    trained_model, tokenizer = load_subject(sub, device)
    data = build_data(cfg.dataset, stage, cfg.train.seed, tokenizer) if not cfg.stage.prompts_only else None
    report: dict[str, Any] = {"subject": sub.label, "stage": stage, "method": cfg.method.name if sub.run_dir else None,
                              "held_out_rows": len(data.eval) if data else len(prompts),
                              "trained": measure(trained_model, tokenizer, sub, data, prompts, opts, plan, accelerator, reward)}
    # The base: RM heads start untrained (accuracy 0.5 by construction) and DPO's base is its own
    # reference (loss log 2), so only their trained figures say anything.
    if opts.base and sub.run_dir is not None and cfg.stage.base_comparable:
        if hasattr(trained_model, "disable_adapter"):
            with trained_model.disable_adapter():
                report["base"] = measure(trained_model, tokenizer, sub, data, prompts, opts, plan, accelerator, reward)
        else:
            del trained_model
            gc.collect()
            trained_model = load_base(sub, device)
            report["base"] = measure(trained_model, tokenizer, sub, data, prompts, opts, plan, accelerator, reward)
    if plan is not None:
        report["benchmark_names"] = plan.names
        plan.folder.cleanup()
    sub.out.mkdir(parents=True, exist_ok=True)
    (sub.out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))

    if summary_plot(report, sub.out / "summary.png"):
        report["plot"] = str(sub.out / "summary.png")
    (sub.out / "report.md").write_text(markdown(report))
    report["out"] = str(sub.out)
    return report


def evaluate_run(run_dir: str | Path, n_prompts: int = 16, max_new: int = 128) -> dict:
    """The report of a run with the default options (no benchmarks)."""
    return evaluate(run=str(run_dir), opts=EvalOptions(n_prompts=n_prompts, max_new=max_new))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def markdown(r: dict) -> str:
    t, b = r["trained"], r.get("base", {})
    lines = [f"# Evaluation of {r['subject']}", "",
             f"Stage {r['stage']}" + (f", method {r['method']}" if r.get("method") else "") +
             f", {r['held_out_rows']} held-out rows.", "", "| | trained | base |", "|---|---:|---:|"]
    rows = [("held-out loss", "loss"), ("perplexity", "perplexity"), ("reward (run's own)", "reward"),
            ("reference answer found", "reference_match")]
    lines += [f"| {label} | {_fmt(t[key])} | {_fmt(b.get(key))} |" for label, key in rows if key in t]
    lines += [f"| {k} | {_fmt(v)} | {_fmt(b.get('metrics', {}).get(k))} |" for k, v in t.get("metrics", {}).items()]
    for task, scores in t.get("benchmarks", {}).items():
        for metric, value in scores.items():
            lines.append(f"| {task} {metric} | {_fmt(value)} | {_fmt(b.get('benchmarks', {}).get(task, {}).get(metric))} |")
    if "generations" in t:
        n = len(t["generations"])
        lines += ["", f"## Greedy answers to {n} held-out prompts", "",
                  "Problems (trained): " + (", ".join(f"{k} {v}/{n}" for k, v in sorted(t["problem_counts"].items())) or "none")]
        if "problem_counts" in b:
            counts = ", ".join(f"{k} {v}/{n}" for k, v in sorted(b["problem_counts"].items()))
            lines.append("Problems (base): " + (counts or "none"))
        lines.append("")
        for g in t["generations"][:8]:
            flag = f" **[{', '.join(g['problems'])}]**" if g["problems"] else ""
            score = f" (reward {g['reward']:.2f})" if "reward" in g else ""
            lines += [f"- Q: {g['prompt'][:120]!r}", f"  A: {g['answer'][:200]!r}{flag}{score}"]
    if r.get("plot"):
        lines += ["", f"![summary]({Path(r['plot']).name})"]
    return "\n".join(lines) + "\n"
