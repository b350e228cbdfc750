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

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ftune.config.registry import register_schema
from ftune.data.badrows import FAIL, BadRows

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

# The file's role values each canonical role accepts by default; a source's `roles` adds its own.
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "chatgpt", "bing", "bard", "model"),
    "tool": ("tool", "observation", "function", "ipython"),
    "tool_call": ("function_call",),  # a turn holding a call as JSON (LLaMA-Factory); becomes an assistant turn
}
SHAREGPT_ROLES = {v: k for k, vals in DEFAULT_ROLES.items() for v in vals}
# The keys a turn's parts are read from, by layout (the first present wins); `message_keys` replaces them.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "role": ("role", "from"), "content": ("content", "value"),
    "reasoning": ("reasoning_content", "reasoning", "thinking"), "tool_calls": ("tool_calls",),
    "train": ("train", "training", "weight"), "name": ("name",),
}
MESSAGE_KEYS = tuple(DEFAULT_KEYS)
register_schema("conversation", "message_keys", MESSAGE_KEYS)
register_schema("conversation", "roles", tuple(DEFAULT_ROLES))
THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


class RowError(ValueError):
    """A row that cannot be read; `to_ftune_error` adds the source and row number."""


@dataclass
class Layout:
    """How one source's conversations are read: message_keys (canonical part -> the file's key) and
    roles (canonical role -> the file's value or values), both on top of the defaults."""

    message_keys: dict[str, str] = field(default_factory=dict)
    roles: dict[str, Any] = field(default_factory=dict)

    def keys(self, part: str, first: str | None = None) -> tuple[str, ...]:
        if part in self.message_keys:
            return (self.message_keys[part],)
        keys = DEFAULT_KEYS[part]
        return (first, *[k for k in keys if k != first]) if first else keys

    def role_table(self) -> dict[str, str]:
        """The file's role value (lower case) -> canonical role."""
        table = {v: k for k, vals in DEFAULT_ROLES.items() for v in vals}
        for role, values in self.roles.items():
            for value in [values] if isinstance(values, str) else values:
                table[str(value).lower()] = role
        return table


PLAIN = Layout()


def _missing(value: Any) -> bool:
    # None, NaN (an empty cell through pandas) and "" (an empty cell through csv) all mean missing.
    return value is None or value == "" or (isinstance(value, float) and value != value)


def _text(row: Row, key: str, required: bool = True) -> str:
    value = row.get(key)
    if _missing(value):
        if required:
            raise RowError(f"column '{key}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise RowError(f"column '{key}' must be text (got {_kind(value)})")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(str, value)) or 'none'}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__


def _system(row: Row, default: str | None) -> list[Record]:
    system = _text(row, "system", required=False) or default
    return [{"role": "system", "content": system}] if system else []


def _json(value: Any, where: str) -> Any:
    """A JSON string (how CSV files and LLaMA-Factory hold lists and tool calls) as its value."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    return value


def _content(value: Any, where: str) -> str:
    """Text, or OpenAI content parts [{"type": "text", "text": ...}] joined."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RowError(f"{where} must be text (got {_kind(value)})")


def _tool_call(call: Any, where: str) -> Record:
    """One call as {"type": "function", "function": {"name", "arguments": {...}}}: from the OpenAI
    layout or a bare {"name", "arguments"} (arguments as an object or as JSON text)."""
    call = _json(call, where)
    if not isinstance(call, dict):
        raise RowError(f"{where} must be an object with 'name' and 'arguments' (got {_kind(call)})")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError(f"{where} has no function name (got {_kind(call)})")
    args = _json(fn.get("arguments", fn.get("parameters", {})), f"{where}.arguments")
    if isinstance(args, str) and not args.strip():
        args = {}
    if not isinstance(args, dict):
        raise RowError(f"{where}.arguments must be an object or JSON text of one (got {_kind(args)})")
    out: Record = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tools_of(row: Row) -> list[Record]:
    """The `tools` column: a list (or JSON text of one) of function schemas, OpenAI-style
    {"type": "function", "function": {...}} or bare {"name", "description", "parameters"}."""
    value = _json(row.get("tools"), "column 'tools'")
    if _missing(value) or value == []:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"column 'tools' must be a list of function schemas (got {_kind(value)})")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"tools[{i}] must be a function schema with a 'name' (got {_kind(tool)})")
        tools.append({"type": "function", "function": fn})
    return tools


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise RowError(f"{where} must be true/false (or 1/0) (got {value!r})")


def _turn(turn: Any, where: str, layout: Layout, first: tuple[str, str], table: dict[str, str]) -> Record:
    if not isinstance(turn, dict):
        raise RowError(f"{where} must be a message object (got {_kind(turn)})")
    role_key = next((k for k in layout.keys("role", first[0]) if k in turn), None)
    content_key = next((k for k in layout.keys("content", first[1]) if k in turn), None)
    calls_key = next((k for k in layout.keys("tool_calls") if k in turn), None)
    if role_key is None or (content_key is None and calls_key is None):
        want_role, want_content = layout.keys("role", first[0])[0], layout.keys("content", first[1])[0]
        raise RowError(f"{where} must have '{want_role}' and '{want_content}'" +
                       (f" (got {_kind(turn)}; map other keys with dataset.sources[i].message_keys)" if turn else ""))
    value = str(turn[role_key])
    role = table.get(value.lower())
    if role is None:
        names = sorted({v for v in table if table[v] in ("system", "user", "assistant", "tool")} |
                       {v for v in table if table[v] == "tool_call"})
        raise RowError(f"{where}.{role_key}='{value}' is not one of {', '.join(names)} (map it with "
                       f"dataset.sources[i].roles, e.g. {{assistant: {value}}})")
    content = _content(turn.get(content_key) if content_key else None, f"{where}.{content_key}")
    message: Record = {"role": role, "content": content}
    if role == "tool_call":  # a call written as its own turn: the assistant calls, its content is the call
        calls = _json(content, f"{where}.{content_key}")
        calls = calls if isinstance(calls, list) else [calls]
        message = {"role": "assistant", "content": "",
                   "tool_calls": [_tool_call(c, f"{where}.{content_key}") for c in calls]}
    elif calls_key and turn.get(calls_key):
        if role != "assistant":
            raise RowError(f"{where} has {calls_key} but its role is {role}: only assistant turns call tools")
        calls = _json(turn[calls_key], f"{where}.{calls_key}")
        if not isinstance(calls, list):
            raise RowError(f"{where}.{calls_key} must be a list of calls (got {_kind(calls)})")
        message["tool_calls"] = [_tool_call(c, f"{where}.{calls_key}[{j}]") for j, c in enumerate(calls)]
    if role == "assistant":
        reasoning_key = next((k for k in layout.keys("reasoning") if k in turn), None)
        reasoning = _content(turn.get(reasoning_key), f"{where}.{reasoning_key}") if reasoning_key else ""
        think = THINK.match(message["content"])
        if think:  # <think>…</think> written into the answer: the same thing as a reasoning field
            reasoning, message["content"] = reasoning or think.group(1).strip(), message["content"][think.end():]
        if reasoning.strip():
            message["reasoning"] = reasoning.strip()
    if role == "tool":
        name_key = next((k for k in layout.keys("name") if k in turn), None)
        if name_key and isinstance(turn.get(name_key), str):
            message["name"] = turn[name_key]
    train_key = next((k for k in layout.keys("train") if k in turn), None)
    if train_key is not None and turn[train_key] is not None:
        message["train"] = _flag(turn[train_key], f"{where}.{train_key}")
    return message


def _turns(turns: Any, column: str, layout: Layout = PLAIN, first: tuple[str, str] = ("role", "content")
           ) -> list[Record]:
    turns = _json(turns, f"column '{column}'")
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column '{column}' must be a non-empty list of turns (got {_kind(turns)})")
    table = layout.role_table()
    return [_turn(t, f"{column}[{i}]", layout, first, table) for i, t in enumerate(turns)]


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
    history = _json(row.get("history"), "column 'history'") or []
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
    if _missing(row.get(column)) and isinstance(row.get(other), (list, str)) and row.get(other):
        column = other  # the two layouts' columns are often swapped; the turns' keys tell them apart anyway
    messages = _turns(row.get(column), column, layout, first)
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
    value = _json(value, f"column '{column}'")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"column '{column}' is empty")
        return [], value
    if _missing(value):
        raise RowError(f"column '{column}' is missing or empty")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"column '{column}' must be text, a message object or a list of messages (got {_kind(value)})")
    turns = _turns(value, column, layout)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"column '{column}' must end with an assistant message (got role {turns[-1]['role']})")
    return turns[:-1], turns[-1]["content"]


def _prompt_turns(row: Row, layout: Layout) -> list[Record]:
    """The prompt of a preference or feedback row: `prompt` (text or messages), else a conversation
    column (LLaMA-Factory's ranking layout), else alpaca's instruction and input; [] when absent."""
    prompt = _json(row.get("prompt"), "column 'prompt'")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _turns(prompt, "prompt", layout)
    if not _missing(prompt):
        raise RowError(f"column 'prompt' must be text or a list of messages (got {_kind(prompt)})")
    for column, first in (("conversations", ("from", "value")), ("messages", ("role", "content"))):
        if not _missing(row.get(column)):
            return _turns(row[column], column, layout, first)
    if not _missing(row.get("instruction")):
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
    prompt = _json(row.get("prompt"), "column 'prompt'")
    if isinstance(prompt, str) or _missing(prompt):
        messages = [{"role": "user", "content": _text(row, "prompt")}]
    else:
        messages = _turns(prompt, "prompt", layout)
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
    if _missing(row.get("completion")):
        column = next((c for c in ("conversations", "messages") if not _missing(row.get(c))), "completion")
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
