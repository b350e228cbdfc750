"""Row formats -> one canonical record.

A canonical record is {"text": str} for raw text (continue-pretraining), or {"messages": [...]}:
a list of {"role": system|user|assistant|tool, "content": str} with, where the data has them,
"reasoning" (an assistant's thinking before its answer), "tool_calls" (an assistant's calls, each
{"type": "function", "function": {"name", "arguments": {...}}}) and "train" (a per-turn flag that
overrides dataset.train_on); a record may carry "tools" (the JSON schemas offered to the model).
Every format below maps a row (after the source's column mapping) to that shape, and names the
row and column when it cannot.

Conversations are read with the source's `message_keys` (which key of a turn holds its role, its
content, …) and `roles` (which values mean user, assistant, …), on top of the defaults of the
common layouts: OpenAI/`messages` (role/content), ShareGPT/LLaMA-Factory (from/value, human/gpt,
function_call/observation) and axolotl's per-turn `train` flags.
"""

from __future__ import annotations

from typing import Any, Callable

from ftune.config.registry import register_schema
from ftune.data.badrows import FAIL, BadRows
from ftune.data.conversations import (
    PLAIN,
    Layout,
    RowError,
    is_missing,
    json_value,
    kind_of,
    read_turns,
    tools_of,
)

Record = dict[str, Any]
Row = dict[str, Any]

# Canonical field names per format: dataset.sources[i].columns maps these to a file's columns.
# REQUIRED says which a row must have; the rest are optional.
FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "qa": ("question", "answer", "system"),
    "messages": ("messages", "system", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "preference": ("prompt", "chosen", "rejected", "system", "conversations", "messages", "instruction", "input"),
    "prompt": ("prompt", "reference", "system"),
    "feedback": ("prompt", "completion", "label", "system", "conversations", "messages"),
}
REQUIRED: dict[str, str] = {
    "text": "text", "alpaca": "instruction, output", "qa": "question, answer", "messages": "messages",
    "sharegpt": "conversations", "preference": "chosen, rejected, and a prompt (prompt, conversations, messages "
    "or instruction) unless chosen and rejected are whole conversations", "prompt": "prompt",
    "feedback": "label, and completion + prompt or a conversation (conversations or messages) ending in the answer",
}
FORMATS = tuple(FIELDS)
for _name, _fields in FIELDS.items():  # the config layer validates dataset.sources[i].format with these
    register_schema("format", _name, _fields)

def _text(row: Row, key: str, required: bool = True) -> str:
    value = row.get(key)
    if is_missing(value):
        if required:
            raise RowError(f"column '{key}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise RowError(f"column '{key}' must be text (got {kind_of(value)})")
    return value



def _system(row: Row, default: str | None) -> list[Record]:
    system = _text(row, "system", required=False) or default
    return [{"role": "system", "content": system}] if system else []



def _check_turns(messages: list[Record]) -> list[Record]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant turn to train on")
    return messages


def from_text(row: Row, system: str | None, layout: Layout) -> Record:
    text = _text(row, "text")
    if not text.strip():
        raise RowError("column 'text' is empty")
    return {"text": text}


def _instruction(row: Row) -> str:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def from_alpaca(row: Row, system: str | None, layout: Layout) -> Record:
    prompt = _instruction(row)
    messages = _system(row, system)
    history = json_value(row.get("history"), "column 'history'") or []
    if not isinstance(history, list):
        raise RowError("column 'history' must be a list of [prompt, answer] pairs")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError("column 'history' must be a list of [prompt, answer] pairs of text")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    return {"messages": messages}


def from_qa(row: Row, system: str | None, layout: Layout) -> Record:
    return {"messages": [*_system(row, system), {"role": "user", "content": _text(row, "question")},
                         {"role": "assistant", "content": _text(row, "answer")}]}


def _conversation(row: Row, column: str, system: str | None, layout: Layout, first: tuple[str, str]) -> Record:
    other = "conversations" if column == "messages" else "messages"
    if is_missing(row.get(column)) and isinstance(row.get(other), (list, str)) and row.get(other):
        column = other  # the two layouts' columns are often swapped; the turns' keys tell them apart anyway
    messages = read_turns(row.get(column), column, layout, first)
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    record: Record = {"messages": _check_turns(messages)}
    tools = tools_of(row)
    if tools:
        record["tools"] = tools
    return record


def from_messages(row: Row, system: str | None, layout: Layout) -> Record:
    return _conversation(row, "messages", system, layout, ("role", "content"))


def from_sharegpt(row: Row, system: str | None, layout: Layout) -> Record:
    return _conversation(row, "conversations", system, layout, ("from", "value"))


def _answer(value: Any, column: str, layout: Layout) -> tuple[list[Record], str]:
    """(conversation before the answer, answer text) from text, one message object (LLaMA-Factory's
    ranking layout) or a message list ending in the assistant's answer (whole conversations per side)."""
    value = json_value(value, f"column '{column}'")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"column '{column}' is empty")
        return [], value
    if is_missing(value):
        raise RowError(f"column '{column}' is missing or empty")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"column '{column}' must be text, a message object or a list of messages (got {kind_of(value)})")
    turns = read_turns(value, column, layout)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"column '{column}' must end with an assistant message (got role {turns[-1]['role']})")
    return turns[:-1], turns[-1]["content"]


def _prompt_turns(row: Row, layout: Layout) -> list[Record]:
    """The prompt of a preference or feedback row: `prompt` (text or messages), else a conversation
    column (LLaMA-Factory's ranking layout), else alpaca's instruction and input; [] when absent."""
    prompt = json_value(row.get("prompt"), "column 'prompt'")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return read_turns(prompt, "prompt", layout)
    if not is_missing(prompt):
        raise RowError(f"column 'prompt' must be text or a list of messages (got {kind_of(prompt)})")
    for column, first in (("conversations", ("from", "value")), ("messages", ("role", "content"))):
        if not is_missing(row.get(column)):
            return read_turns(row[column], column, layout, first)
    if not is_missing(row.get("instruction")):
        return [{"role": "user", "content": _instruction(row)}]
    return []


def from_preference(row: Row, system: str | None, layout: Layout) -> Record:
    """A prompt + chosen + rejected; the prompt may be absent when chosen and rejected are whole
    conversations that share everything but the final answer."""
    before_c, chosen = _answer(row.get("chosen"), "chosen", layout)
    before_r, rejected = _answer(row.get("rejected"), "rejected", layout)
    messages = _prompt_turns(row, layout)
    if not messages:
        if not before_c or before_c != before_r:
            raise RowError("no prompt (columns prompt, conversations, messages or instruction), and chosen/rejected "
                           "do not share the conversation before the answer")
        messages = before_c
    elif before_c and isinstance(row.get("prompt"), str):
        messages = before_c
    if messages[-1]["role"] == "assistant":
        raise RowError("the prompt ends with an assistant turn; it must end where the answers start (a user turn)")
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    return {"messages": messages, "chosen": chosen, "rejected": rejected}


def from_prompt(row: Row, system: str | None, layout: Layout) -> Record:
    """A prompt to answer (PPO rollouts): text or a message list ending with a user turn, and an
    optional reference answer that rule-based rewards may check against."""
    prompt = json_value(row.get("prompt"), "column 'prompt'")
    if isinstance(prompt, str) or is_missing(prompt):
        messages = [{"role": "user", "content": _text(row, "prompt")}]
    else:
        messages = read_turns(prompt, "prompt", layout)
        if messages[-1]["role"] != "user":
            raise RowError("column 'prompt' must end with a user message")
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    reference = _text(row, "reference", required=False)
    return {"messages": messages, **({"reference": reference} if reference else {})}


# True/False also match the numbers 1/0 (equal keys in a dict)
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False,
          "good": True, "bad": False, "desirable": True, "undesirable": False}


def from_feedback(row: Row, system: str | None, layout: Layout) -> Record:
    """Unpaired feedback (KTO): a prompt, one answer, and whether the answer is desirable. The
    answer is the completion column, or the last turn of a conversation (LLaMA-Factory's KTO
    layout: messages + a true/false tag)."""
    label = row.get("label")
    key = label.strip().lower() if isinstance(label, str) else label
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    if key not in LABELS:
        raise RowError(f"column 'label' must be true/false (or 1/0, good/bad), got {label!r}")
    if is_missing(row.get("completion")):
        column = next((c for c in ("conversations", "messages") if not is_missing(row.get(c))), "completion")
        before, completion = _answer(row.get(column), column, layout)
        messages = before
    else:
        before, completion = _answer(row.get("completion"), "completion", layout)
        messages = _prompt_turns(row, layout) or before
    if not messages:
        raise RowError("column 'prompt' is missing or empty")
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    return {"messages": messages, "completion": completion, "label": LABELS[key]}


CONVERTERS: dict[str, Callable[[Row, str | None, Layout], Record]] = {
    "text": from_text, "alpaca": from_alpaca, "qa": from_qa, "messages": from_messages, "sharegpt": from_sharegpt,
    "preference": from_preference, "prompt": from_prompt, "feedback": from_feedback,
}


def map_columns(row: Row, columns: dict[str, str]) -> Row:
    """Rename a row's columns to the canonical names given by the source's `columns` mapping."""
    if not columns:
        return row
    out = dict(row)
    for canonical, column in columns.items():
        if column in row:
            out[canonical] = row[column]
    return out


def expects(fmt: str) -> str:
    optional = [f for f in FIELDS[fmt] if f not in REQUIRED[fmt].replace(",", " ").split()]
    return f"format={fmt} needs {REQUIRED[fmt]}" + (f"; optional: {', '.join(optional)}" if optional else "")


def to_records(rows: list[Row], fmt: str, columns: dict[str, str], system: str | None, where: str,
               bad: BadRows = FAIL, layout: Layout = PLAIN) -> list[Record]:
    """Convert every row; a bad row is named by number with the problem and the fix (and stops
    the run, or is skipped and counted with dataset.on_bad_row=skip)."""
    convert = CONVERTERS[fmt]
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(convert(map_columns(row, columns), system, layout))
        except RowError as exc:
            found = ", ".join(sorted(map(str, row))) or "none"
            bad.found(f"{where}, row {i + 1}: {exc}", [expects(fmt), f"the row has columns: {found}"],
                      "Fix the row, or map your column names with dataset.sources[i].columns "
                      "(and a conversation's keys and roles with message_keys and roles).")
    return records
