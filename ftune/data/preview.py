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
    samples, stats = tokenize_records(train[:n], cfg.dataset, tokenizer)
    console.print(f"dataset={cfg.dataset.name} template={cfg.dataset.template} train_on={cfg.dataset.train_on} "
                  f"max_seq_len={cfg.dataset.max_seq_len}   [bold green]trained[/] / [dim]masked[/]")
    for i, sample in enumerate(samples):
        trained = sum(label != IGNORE for label in sample["labels"][1:])
        console.rule(f"sample {i + 1}: {len(sample['input_ids'])} tokens, {trained} trained, "
                     f"{len(sample['input_ids']) - trained} masked")
        console.print(colour_sample(sample, tokenizer))
    if stats.truncated:
        console.print(f"[yellow]{stats.truncated} of these samples were truncated to {cfg.dataset.max_seq_len} tokens")
