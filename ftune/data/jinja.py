"""A named template as a Jinja chat template, for tools that read the tokenizer's chat template (a
merged model, GGUF files, vLLM, ollama): it renders conversations, tools, tool calls and results and
the last answer's reasoning exactly as `templates.render_named` does for training."""

from __future__ import annotations

import json
from typing import Any

from ftune.data.templates import PLACEHOLDER, Template


def to_jinja(template: Template, tokenizer: Any) -> str:
    """A Jinja chat template that renders conversations exactly as `render_named` does, for tools
    that read the tokenizer's chat template (a merged model, GGUF files, vLLM, ollama). Literal
    text is emitted as quoted strings, so no whitespace control can change it; the tokenizer's
    BOS/EOS are filled in now."""

    def expr(fmt: str) -> str:
        values = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}
        parts, pos = [], 0
        for m in PLACEHOLDER.finditer(fmt):
            parts.append(json.dumps(fmt[pos:m.start()]))
            key = m.group(1)
            parts.append(json.dumps(values[key]) if key in values else
                         "m['content']" if key == "content" else "(ns.system or '')")
            pos = m.end()
        parts.append(json.dumps(fmt[pos:]))
        return "{{ " + " ~ ".join(p for p in parts if p != '""') + " }}" if any(p != '""' for p in parts) else ""

    def with_content(fmt: str, value: str) -> str:
        return expr(fmt).replace("m['content']", value)

    inline = bool(template.user_with_system)
    tools = ""
    if template.tools:  # the offered tools go into the system prompt, one JSON schema a line
        listing = "(tools | map('tojson') | join('\\n'))"
        tools = ("{%- if tools -%}{%- set ns.system = (" + expr(template.tools).removeprefix("{{ ").removesuffix(" }}")
                 .replace("m['content']", listing) + ").lstrip('\\n') -%}{%- endif -%}")
    calls = ""
    if template.tool_call:
        call = "({'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson)"
        one = expr(template.tool_call).removeprefix("{{ ").removesuffix(" }}").replace("m['content']", call)
        calls = ("{%- set body = namespace(text=m['content'] or '') -%}{%- for c in (m['tool_calls'] or []) -%}"
                 "{%- set body.text = body.text ~ ('\\n' if body.text else '') ~ " + one + " -%}{%- endfor -%}")
    reasoning = ""
    if template.reasoning:
        reasoning = ("{%- if loop.index0 == ns.last and m['reasoning_content'] -%}"
                     + with_content(template.reasoning, "m['reasoning_content']") + "{%- endif -%}")
    answer = with_content(template.assistant, "body.text") if calls else expr(template.assistant)
    return "".join([
        "{%- set ns = namespace(system=" + json.dumps(template.default_system) .replace("null", "none") + ", last=-1) -%}",
        "{%- set msgs = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- set msgs = messages[1:] -%}{%- endif -%}",
        "{%- for m in msgs -%}{%- if m['role'] == 'assistant' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}",
        tools,
        expr(template.prefix),
        "{%- if ns.system -%}" + ("" if inline else expr(template.system).replace("m['content']", "ns.system")) + "{%- endif -%}",
        "{%- for m in msgs -%}",
        "{%- if m['role'] == 'user' -%}",
        ("{%- if ns.system and loop.first -%}" + expr(template.user_with_system) + "{%- else -%}" + expr(template.user)
         + "{%- endif -%}") if inline else expr(template.user),
        "{%- elif m['role'] == 'assistant' -%}", reasoning, calls, answer, expr(template.separator),
        ("{%- elif m['role'] == 'tool' -%}" + expr(template.tool)) if template.tool else "",
        "{%- endif -%}{%- endfor -%}",
    ])
