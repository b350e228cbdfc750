"""`ftune data preview`: rendered samples with trained tokens highlighted, and token counts.

The samples are made exactly as training makes them (the same reading, bad-row policy, template,
masks and truncation), so tool calls, reasoning, an inserted system prompt and what is cut all
show as they will be trained."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ftune import resources
from ftune.config.schema import FtuneConfig
from ftune.data.badrows import BadRows
from ftune.data.build import data_notes, split_records, tokenize_records
from ftune.data.notes import data_report
from ftune.data.tokenize import IGNORE
from ftune.models.load import load_tokenizer, resolve_model_path


def colour_sample(sample: dict, tokenizer: Any) -> Text:
    """Trained tokens in green, masked (prompt, template) tokens dimmed. Runs of tokens with the
    same mask are decoded together, so characters spanning several tokens show whole."""
    text, run, trained_run = Text(), [], None
    for i, (tok, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        trained = label != IGNORE and i > 0
        if run and trained != trained_run:
            text.append(tokenizer.decode(run), style="bold green" if trained_run else "dim")
            run = []
        run.append(tok)
        trained_run = trained
    if run:
        text.append(tokenizer.decode(run), style="bold green" if trained_run else "dim")
    return text


def _sources(cfg: FtuneConfig) -> str:
    return ", ".join(f"{resources.resolve_path(s.path)} ({s.format})" for s in cfg.dataset.sources)


def preview(cfg: FtuneConfig, n: int, console: Console) -> None:
    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
    bad = BadRows(skip=cfg.dataset.on_bad_row == "skip")
    train, _ = split_records(cfg.dataset, cfg.train.seed, bad)
    samples, stats = tokenize_records(train[:n], cfg.dataset, tokenizer, cfg.stage.prompts_only)
    console.print(f"data: {escape(_sources(cfg))}", soft_wrap=True)
    console.print(f"dataset={cfg.dataset.name} template={cfg.dataset.template} train_on={cfg.dataset.train_on} "
                  f"max_seq_len={cfg.dataset.max_seq_len}   [bold green]trained[/] / [dim]masked[/]")
    for i, sample in enumerate(samples):
        if "prompt_ids" in sample:  # PPO: the prompt the policy answers, and the reference answer
            console.rule(f"prompt {i + 1}: {len(sample['prompt_ids'])} tokens")
            console.print(Text(tokenizer.decode(sample["prompt_ids"]), style="dim"))
            console.print(f"[bold]reference:[/] {escape(str(sample.get('reference')))}")
            continue
        parts = [("chosen", sample["chosen"]), ("rejected", sample["rejected"])] if "chosen" in sample else [
            ("desirable" if sample["label"] else "undesirable", sample) if "label" in sample else ("", sample)]
        for kind, row in parts:
            trained = sum(label != IGNORE for label in row["labels"][1:])
            console.rule(f"sample {i + 1}{' ' + kind if kind else ''}: {len(row['input_ids'])} tokens, {trained} "
                         f"trained, {len(row['input_ids']) - trained} masked")
            console.print(colour_sample(row, tokenizer))
    shown = {"train": dataclasses.asdict(stats), "notes": data_notes(train[:n], cfg.dataset, tokenizer)}
    console.rule()
    console.print(f"{len(samples)} samples from the first {min(n, len(train))} of {len(train)} training rows")
    for level, line in data_report(shown, cfg.dataset.max_seq_len):
        console.print(f"[yellow]{level}:[/] {escape(line)}", soft_wrap=True)
    if bad.count:
        console.print(f"[yellow]note:[/] {bad.count} bad rows skipped (dataset.on_bad_row=skip), e.g.:")
        for example in bad.examples:
            console.print(f"  - {escape(example)}", soft_wrap=True)
