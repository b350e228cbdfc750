"""Row formats -> one canonical record.

A canonical record is {"text": str} for raw text (continue-pretraining), or {"messages": [...]}:
a list of {"role": system|user|assistant, "content": str}. Every format below maps a row (after
the source's column mapping) to that shape, and names the row and column when it cannot.
"""

from __future__ import annotations

from typing import Any, Callable

from ftune.config.registry import register_schema
from ftune.data.badrows import FAIL, BadRows

Record = dict[str, Any]
Row = dict[str, Any]

# Canonical field names per format: dataset.sources[i].columns maps these to a file's columns.
FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "qa": ("question", "answer", "system"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "preference": ("prompt", "chosen", "rejected", "system"),
    "prompt": ("prompt", "reference", "system"),
    "feedback": ("prompt", "completion", "label", "system"),
}
FORMATS = tuple(FIELDS)
for _name, _fields in FIELDS.items():  # the config layer validates dataset.sources[i].format with these
    register_schema("format", _name, _fields)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class RowError(ValueError):
    """A row that cannot be read; `to_ftune_error` adds the source and row number."""


def _text(row: Row, key: str, required: bool = True) -> str:
    value = row.get(key)
    # None, NaN (an empty cell through pandas) and "" (an empty cell through csv) all mean missing.
    if value is None or value == "" or (isinstance(value, float) and value != value):
        if required:
            raise RowError(f"column '{key}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise RowError(f"column '{key}' must be text (got {type(value).__name__})")
    return value


def _system(row: Row, default: str | None) -> list[Record]:
    system = _text(row, "system", required=False) or default
    return [{"role": "system", "content": system}] if system else []


def from_text(row: Row, system: str | None) -> Record:
    text = _text(row, "text")
    if not text.strip():
        raise RowError("column 'text' is empty")
    return {"text": text}


def from_alpaca(row: Row, system: str | None) -> Record:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = _system(row, system)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("column 'history' must be a list of [prompt, answer] pairs")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError("column 'history' must be a list of [prompt, answer] pairs of text")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    return {"messages": messages}


def from_qa(row: Row, system: str | None) -> Record:
    return {"messages": [*_system(row, system), {"role": "user", "content": _text(row, "question")},
                         {"role": "assistant", "content": _text(row, "answer")}]}


def _turns(turns: Any, column: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Record]:
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column '{column}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise RowError(f"{column}[{i}] must have '{role_key}' and '{content_key}'")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError(f"{column}[{i}].{role_key}='{turn[role_key]}' is not one of {', '.join(sorted(roles))}")
        if not isinstance(turn[content_key], str):
            raise RowError(f"{column}[{i}].{content_key} must be text")
        out.append({"role": role, "content": turn[content_key]})
    return out


def _check_turns(messages: list[Record]) -> list[Record]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant turn to train on")
    return messages


def from_messages(row: Row, system: str | None) -> Record:
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    messages = _turns(row.get("messages"), "messages", "role", "content", roles)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": _check_turns(messages)}


def from_sharegpt(row: Row, system: str | None) -> Record:
    messages = _turns(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    return {"messages": _check_turns(messages)}


def _answer(value: Any, column: str) -> tuple[list[Record], str]:
    """(conversation before the answer, answer text) from a string or a message list ending in
    the assistant's answer (the shape of many preference sets: whole conversations per side)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"column '{column}' is empty")
        return [], value
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    turns = _turns(value, column, "role", "content", roles)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"column '{column}' must end with an assistant message")
    return turns[:-1], turns[-1]["content"]


def from_preference(row: Row, system: str | None) -> Record:
    """prompt + chosen + rejected; prompt may be text or messages, or be absent when chosen and
    rejected are whole conversations that share everything but the final answer."""
    before_c, chosen = _answer(row.get("chosen"), "chosen")
    before_r, rejected = _answer(row.get("rejected"), "rejected")
    prompt = row.get("prompt")
    if prompt is None or prompt == "":
        if not before_c or before_c != before_r:
            raise RowError("no 'prompt' column, and chosen/rejected do not share the conversation before the answer")
        messages = before_c
    elif isinstance(prompt, str):
        messages = [*before_c, {"role": "user", "content": prompt}] if not before_c else before_c
    else:
        messages = _turns(prompt, "prompt", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    return {"messages": messages, "chosen": chosen, "rejected": rejected}


def from_prompt(row: Row, system: str | None) -> Record:
    """A prompt to answer (PPO rollouts): text or a message list ending with a user turn, and an
    optional reference answer that rule-based rewards may check against."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _text(row, "prompt")}]
    else:
        roles = {"system": "system", "user": "user", "assistant": "assistant"}
        messages = _turns(prompt, "prompt", "role", "content", roles)
        if messages[-1]["role"] != "user":
            raise RowError("column 'prompt' must end with a user message")
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    reference = _text(row, "reference", required=False)
    return {"messages": messages, **({"reference": reference} if reference else {})}


# True/False also match the numbers 1/0 (equal keys in a dict)
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False,
          "good": True, "bad": False, "desirable": True, "undesirable": False}


def from_feedback(row: Row, system: str | None) -> Record:
    """Unpaired feedback (KTO): a prompt, one answer, and whether the answer is desirable."""
    before, completion = _answer(row.get("completion"), "completion")
    label = row.get("label")
    key = label.strip().lower() if isinstance(label, str) else label
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    if key not in LABELS:
        raise RowError(f"column 'label' must be true/false (or 1/0, good/bad), got {label!r}")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = _turns(prompt, "prompt", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})
    elif before:
        messages = before
    else:
        messages = [{"role": "user", "content": _text(row, "prompt")}]
    if messages[0]["role"] != "system":
        messages = _system(row, system) + messages
    return {"messages": messages, "completion": completion, "label": LABELS[key]}


CONVERTERS: dict[str, Callable[[Row, str | None], Record]] = {
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


def to_records(rows: list[Row], fmt: str, columns: dict[str, str], system: str | None, where: str,
               bad: BadRows = FAIL) -> list[Record]:
    """Convert every row; a bad row is named by number with the problem and the fix (and stops
    the run, or is skipped and counted with dataset.on_bad_row=skip)."""
    convert = CONVERTERS[fmt]
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(convert(map_columns(row, columns), system))
        except RowError as exc:
            found = ", ".join(sorted(map(str, row))) or "none"
            bad.found(f"{where}, row {i + 1}: {exc}", [f"format={fmt} expects columns: {', '.join(FIELDS[fmt])}",
                                                      f"the row has columns: {found}"],
                      "Fix the row, or map your column names with dataset.sources[i].columns.")
    return records
