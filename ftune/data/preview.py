"""`ftune data preview`: rendered samples with trained tokens highlighted, and token counts."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from ftune.config.schema import FtuneConfig
from ftune.data.build import split_records, tokenize_records
from ftune.data.tokenize import IGNORE
from ftune.models.load import load_tokenizer, resolve_model_path


def colour_sample(sample: dict, tokenizer: Any) -> Text:
    """Trained tokens in green, masked (prompt, template) tokens dimmed."""
    text = Text()
    for i, (tok, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        trained = label != IGNORE and i > 0
        text.append(tokenizer.decode([tok]), style="bold green" if trained else "dim")
    return text


def preview(cfg: FtuneConfig, n: int, console: Console) -> None:
    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
    train, _ = split_records(cfg.dataset, cfg.train.seed)
    samples, stats = tokenize_records(train[:n], cfg.dataset, tokenizer, cfg.stage.prompts_only)
    console.print(f"dataset={cfg.dataset.name} template={cfg.dataset.template} train_on={cfg.dataset.train_on} "
                  f"max_seq_len={cfg.dataset.max_seq_len}   [bold green]trained[/] / [dim]masked[/]")
    for i, sample in enumerate(samples):
        if "prompt_ids" in sample:  # PPO: the prompt the policy answers, and the reference answer
            console.rule(f"prompt {i + 1}: {len(sample['prompt_ids'])} tokens")
            console.print(Text(tokenizer.decode(sample["prompt_ids"]), style="dim"))
            console.print(f"[bold]reference:[/] {sample.get('reference')}")
            continue
        parts = [("chosen", sample["chosen"]), ("rejected", sample["rejected"])] if "chosen" in sample else [
            ("desirable" if sample["label"] else "undesirable", sample) if "label" in sample else ("", sample)]
        for kind, row in parts:
            trained = sum(label != IGNORE for label in row["labels"][1:])
            console.rule(f"sample {i + 1}{' ' + kind if kind else ''}: {len(row['input_ids'])} tokens, {trained} "
                         f"trained, {len(row['input_ids']) - trained} masked")
            console.print(colour_sample(row, tokenizer))
    if stats.truncated:
        console.print(f"[yellow]{stats.truncated} of these samples were truncated to {cfg.dataset.max_seq_len} tokens")
