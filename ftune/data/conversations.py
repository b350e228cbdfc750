"""Conversation turns of any common layout -> canonical messages.

A turn is read with the source's `message_keys` (which key holds its role, its content, …) and
`roles` (which values mean user, assistant, …) on top of the usual names: OpenAI's role/content,
ShareGPT's and LLaMA-Factory's from/value (human/gpt, function_call/observation), axolotl's
per-turn `train` flags. Tool calls (OpenAI `tool_calls`, or a `function_call` turn holding the call
as JSON) and reasoning (`reasoning_content`, or `<think>…</think>` before the answer) become the
canonical "tool_calls" and "reasoning" keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ftune.config.registry import register_schema

Record = dict[str, Any]
Row = dict[str, Any]

# The file's role values each canonical role accepts by default; a source's `roles` adds its own.
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "chatgpt", "bing", "bard", "model"),
    "tool": ("tool", "observation", "function", "ipython"),
    "tool_call": ("function_call",),  # a turn holding a call as JSON (LLaMA-Factory); becomes an assistant turn
}
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

    @cached_property
    def role_table(self) -> dict[str, str]:
        """The file's role value (lower case) -> canonical role (built once per source)."""
        table = {v: k for k, vals in DEFAULT_ROLES.items() for v in vals}
        for role, values in self.roles.items():
            for value in [values] if isinstance(values, str) else values:
                table[str(value).lower()] = role
        return table


PLAIN = Layout()


def is_missing(value: Any) -> bool:
    # None, NaN (an empty cell through pandas) and "" (an empty cell through csv) all mean missing.
    return value is None or value == "" or (isinstance(value, float) and value != value)


def kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(str, value)) or 'none'}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__


def json_value(value: Any, where: str) -> Any:
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
    raise RowError(f"{where} must be text (got {kind_of(value)})")


def _tool_call(call: Any, where: str) -> Record:
    """One call as {"type": "function", "function": {"name", "arguments": {...}}}: from the OpenAI
    layout or a bare {"name", "arguments"} (arguments as an object or as JSON text)."""
    call = json_value(call, where)
    if not isinstance(call, dict):
        raise RowError(f"{where} must be an object with 'name' and 'arguments' (got {kind_of(call)})")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError(f"{where} has no function name (got {kind_of(call)})")
    args = json_value(fn.get("arguments", fn.get("parameters", {})), f"{where}.arguments")
    if isinstance(args, str) and not args.strip():
        args = {}
    if not isinstance(args, dict):
        raise RowError(f"{where}.arguments must be an object or JSON text of one (got {kind_of(args)})")
    out: Record = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tools_of(row: Row) -> list[Record]:
    """The `tools` column: a list (or JSON text of one) of function schemas, OpenAI-style
    {"type": "function", "function": {...}} or bare {"name", "description", "parameters"}."""
    value = json_value(row.get("tools"), "column 'tools'")
    if is_missing(value) or value == []:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"column 'tools' must be a list of function schemas (got {kind_of(value)})")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"tools[{i}] must be a function schema with a 'name' (got {kind_of(tool)})")
        tools.append({"type": "function", "function": fn})
    return tools


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise RowError(f"{where} must be true/false (or 1/0) (got {value!r})")


def _turn(turn: Any, where: str, layout: Layout, first: tuple[str, str], table: dict[str, str]) -> Record:
    if not isinstance(turn, dict):
        raise RowError(f"{where} must be a message object (got {kind_of(turn)})")
    role_key = next((k for k in layout.keys("role", first[0]) if k in turn), None)
    content_key = next((k for k in layout.keys("content", first[1]) if k in turn), None)
    calls_key = next((k for k in layout.keys("tool_calls") if k in turn), None)
    if role_key is None or (content_key is None and calls_key is None):
        want_role, want_content = layout.keys("role", first[0])[0], layout.keys("content", first[1])[0]
        raise RowError(f"{where} must have '{want_role}' and '{want_content}'" +
                       (f" (got {kind_of(turn)}; map other keys with dataset.sources[i].message_keys)" if turn else ""))
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
        calls = json_value(content, f"{where}.{content_key}")
        calls = calls if isinstance(calls, list) else [calls]
        message = {"role": "assistant", "content": "",
                   "tool_calls": [_tool_call(c, f"{where}.{content_key}") for c in calls]}
    elif calls_key and turn.get(calls_key):
        if role != "assistant":
            raise RowError(f"{where} has {calls_key} but its role is {role}: only assistant turns call tools")
        calls = json_value(turn[calls_key], f"{where}.{calls_key}")
        if not isinstance(calls, list):
            raise RowError(f"{where}.{calls_key} must be a list of calls (got {kind_of(calls)})")
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


def read_turns(turns: Any, column: str, layout: Layout = PLAIN, first: tuple[str, str] = ("role", "content")
           ) -> list[Record]:
    turns = json_value(turns, f"column '{column}'")
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column '{column}' must be a non-empty list of turns (got {kind_of(turns)})")
    table = layout.role_table
    return [_turn(t, f"{column}[{i}]", layout, first, table) for i, t in enumerate(turns)]
