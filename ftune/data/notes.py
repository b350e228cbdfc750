"""What the data does that a user may not expect, said before training: a default system prompt
the template inserts, placeholders left in trained text. Each note is one line for the run's data
report, `ftune data preview` and data_stats.json."""

from __future__ import annotations

import re
from typing import Any

from ftune.data.templates import Template, default_system_block

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}")


def fill_placeholders(records: list[dict], values: dict[str, str]) -> None:
    """{{name}} -> values[name] in every text of every record (in place)."""
    if not values:
        return

    def fill(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)

    for record in records:
        for message in record.get("messages", []):
            message["content"] = fill(message["content"])
        for key in ("text", "chosen", "rejected", "completion", "reference"):
            if isinstance(record.get(key), str):
                record[key] = fill(record[key])


def _trained_texts(record: dict) -> list[str]:
    if "text" in record:
        return [record["text"]]
    answers = [m["content"] for m in record.get("messages", []) if m["role"] == "assistant"]
    return answers + [record[k] for k in ("chosen", "rejected", "completion") if isinstance(record.get(k), str)]


def placeholder_note(records: list[dict]) -> str | None:
    rows, names = 0, set()
    first = None
    for i, record in enumerate(records):
        found = {m.group(1) for text in _trained_texts(record) for m in PLACEHOLDER.finditer(text)}
        if found:
            rows += 1
            names |= found
            first = first if first is not None else i
    if not rows:
        return None
    listed = ", ".join("{{" + n + "}}" for n in sorted(names)[:5])
    example = sorted(names)[0]
    return (f"{rows} of {len(records)} rows train unfilled placeholders ({listed}; first in training row {first + 1}): "
            f"fill them with dataset.placeholders.{example}=<text>, or the model learns to say them")


def system_note(records: list[dict], template: Template | None, tokenizer: Any, system: str | None) -> str | None:
    """The template's default system prompt goes into every row without one, unless
    dataset.system="" (then it is left out) or dataset.system sets another."""
    if system == "":
        return None
    if template is None:
        default = default_system_block(tokenizer)[1] if getattr(tokenizer, "chat_template", None) else ""
        whose = "the model's chat template"
    else:
        default, whose = template.default_system or "", f"template '{template.name}'"
    without = sum(1 for r in records if r.get("messages") and r["messages"][0]["role"] != "system")
    if not default or not without:
        return None
    return (f"{whose} inserts its default system prompt \"{default[:100]}\" into the {without} of {len(records)} rows "
            f"that have none: dataset.system=\"\" leaves it out, dataset.system=\"...\" sets your own")


def _n(count: int, one: str, many: str) -> str:
    return f"{count:,} {one if count == 1 else many}"


def data_report(stats: dict, max_seq_len: int) -> list[tuple[str, str]]:
    """The data report's lines after the counts, as (note|warning, text)."""
    t = stats["train"]
    lines = [("warning", line) for line in data_warnings(stats, max_seq_len)]
    lines += [("note", line) for line in stats.get("notes") or []]
    if t.get("documents"):
        docs, split = _n(t["documents"], "document", "documents"), _n(t["split_documents"], "long document", "long documents")
        lines.insert(0, ("note", f"raw text: {docs}, {t['tokens_read']:,} tokens read, all in blocks of <= {max_seq_len} "
                                 f"({split} split across blocks, none cut)"))
    return lines


def data_warnings(stats: dict, max_seq_len: int) -> list[str]:
    """Counts of what was cut or dropped."""
    t, lines = stats["train"], []
    if t["truncated"]:
        lines.append(f"{_n(t['truncated'], 'sample was', 'samples were')} longer than dataset.max_seq_len={max_seq_len} "
                     "and cut at its end")
    if t.get("prompt_truncated"):
        lines.append(f"{_n(t['prompt_truncated'], 'prompt was', 'prompts were')} longer than dataset.max_seq_len="
                     f"{max_seq_len} allows beside its answers: its oldest tokens were left out (answers kept whole)")
    if t["dropped_no_target"]:
        lines.append(f"{_n(t['dropped_no_target'], 'sample was', 'samples were')} dropped: no trained token fits in "
                     f"dataset.max_seq_len={max_seq_len} (raise it, or check the template and dataset.train_on)")
    return lines
