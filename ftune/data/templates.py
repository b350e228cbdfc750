"""Prompt templates: a canonical record -> text segments, each marked trained or masked.

Named templates are YAML files in data_templates/ (see chatml.yaml for the fields). The `model`
template uses the tokenizer's own chat template: it renders the conversation one message longer
at a time, and the text each assistant message adds is what gets trained.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ftune import resources
from ftune.errors import FtuneError
from ftune.registry import unknown_name_error
from ftune.yamlfile import read_mapping


@dataclass
class Segment:
    """A run of text: `train` marks an assistant turn; `turn` counts assistant turns (0-based)."""

    text: str
    train: bool
    turn: int = -1


@dataclass
class Template:
    """A prompt format. `{content}`, `{system}`, `{bos}` and `{eos}` are filled in when rendering."""

    name: str
    user: str
    assistant: str
    system: str = ""
    user_with_system: str = ""
    prefix: str = ""
    separator: str = ""
    default_system: str | None = None
    stop: str = "{eos}"
    description: str = ""


def load_template(name: str) -> Template | None:
    """A named template (data_templates/<name>.yaml), a template file of the user's (a path ending
    in .yaml), or None for `model` (the tokenizer's chat template)."""
    if name == "model":
        return None
    path = resources.templates_dir() / f"{name}.yaml"
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FtuneError(f"dataset.template: {path} does not exist",
                             hint="Give a template file, a shipped name (chatml, llama3, ...) or `model`.")
    elif not path.is_file():
        names = ["model", *(p.stem for p in resources.templates_dir().glob("*.yaml"))]
        raise unknown_name_error("template", name, names, key="dataset.template")
    data = read_mapping(path, "a template")
    fields = {f.name for f in dataclasses.fields(Template)} - {"name"}
    unknown, missing = sorted(set(data) - fields), [f for f in ("user", "assistant") if not data.get(f)]
    if unknown or missing:
        raise FtuneError(f"{path}: not a usable template",
                         [*(f"unknown field '{k}'" for k in unknown), *(f"'{k}' is missing or empty" for k in missing)],
                         "A template needs user and assistant parts; see data_templates/chatml.yaml for every field.")
    if "{content}" not in str(data["assistant"]):
        raise FtuneError(f"{path}: the assistant part has no {{content}}, so no answer would be trained",
                         hint='Write the answer\'s place as {content}, e.g. assistant: "{content}<|im_end|>".')
    return Template(name=path.stem, **{k: str(v) if v is not None else v for k, v in data.items()})


PLACEHOLDER = re.compile(r"\{(content|system|bos|eos)\}")


def _fill(fmt: str, tokenizer: Any, **values: str) -> str:
    """Fill the template's placeholders in one pass: text that is filled in is never scanned
    again, so a message may itself contain "{system}" or other braces."""
    values = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or "", **values}
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


def render_named(template: Template, messages: list[dict], tokenizer: Any) -> list[Segment]:
    system = template.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segments = [Segment(_fill(template.prefix, tokenizer), False)]
    use_inline_system = bool(system and template.user_with_system)
    if system and not use_inline_system:
        segments.append(Segment(_fill(template.system, tokenizer, content=system), False))
    turn = 0
    for i, message in enumerate(messages):
        if message["role"] == "user":
            fmt = template.user_with_system if (use_inline_system and i == 0) else template.user
            segments.append(Segment(_fill(fmt, tokenizer, content=message["content"], system=system or ""), False))
        elif message["role"] == "assistant":
            segments.append(Segment(_fill(template.assistant, tokenizer, content=message["content"]), True, turn))
            segments.append(Segment(_fill(template.separator, tokenizer), False))
            turn += 1
        else:
            raise FtuneError(f"template '{template.name}': a '{message['role']}' message may only come first")
    return [s for s in segments if s.text]


def apply_chat_template(tokenizer: Any, messages: list[dict], **kwargs: Any) -> str:
    """The tokenizer's own Jinja chat template. transformers renders it in Jinja's immutable
    sandbox, so a template cannot reach Python internals; a refused or broken template becomes an
    FtuneError instead of a traceback."""

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.exceptions.SecurityError as exc:
        raise FtuneError("the tokenizer's chat template tried an operation the Jinja sandbox forbids",
                         [str(exc)[:200]], "Use a named template instead, e.g. dataset.template=chatml.") from None
    except jinja2.exceptions.TemplateError as exc:
        raise FtuneError(f"the tokenizer's chat template failed to render: {type(exc).__name__}: {str(exc)[:200]}",
                         hint="Fix tokenizer_config.json's chat_template, or use a named template "
                              "(dataset.template=chatml).") from None


def render_model(messages: list[dict], tokenizer: Any) -> list[Segment]:
    if not getattr(tokenizer, "chat_template", None):
        raise FtuneError("dataset.template=model, but the tokenizer has no chat template",
                         hint="Pick a named template, e.g. dataset.template=chatml.")
    segments, done, turn = [], "", 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = apply_chat_template(tokenizer, messages[:i], tokenize=False, add_generation_prompt=True)
            _append(segments, done, prompt, False, turn)
            done = prompt
        text = apply_chat_template(tokenizer, messages[: i + 1], tokenize=False)
        is_answer = message["role"] == "assistant"
        _append(segments, done, text, is_answer, turn)
        done = text
        turn += is_answer
    return [s for s in segments if s.text]


def _append(segments: list[Segment], done: str, text: str, train: bool, turn: int) -> None:
    if not text.startswith(done):
        raise FtuneError("the tokenizer's chat template does not render a conversation as a growing prefix, so "
                         "prompt and answer tokens cannot be told apart",
                         hint="Use a named template instead, e.g. dataset.template=chatml.")
    segments.append(Segment(text[len(done):], train, turn if train else -1))


def render(record: dict, template: Template | None, tokenizer: Any) -> list[Segment]:
    """Segments for one canonical record. Raw text is trained whole, with EOS appended."""
    if "text" in record:
        return [Segment(record["text"] + (tokenizer.eos_token or ""), True, 0)]
    if template is None:
        return render_model(record["messages"], tokenizer)
    return render_named(template, record["messages"], tokenizer)


def render_prompt(messages: list[dict], template: Template | None, tokenizer: Any) -> str:
    """The text a model continues to answer `messages` (which end with a user turn)."""
    if template is None:
        return apply_chat_template(tokenizer, messages, tokenize=False, add_generation_prompt=True)
    return "".join(s.text for s in render_named(template, messages, tokenizer))


def stop_text(template: Template | None, tokenizer: Any) -> str:
    """The string that ends an assistant turn (generation stops on its token)."""
    if template is None:
        return tokenizer.eos_token or ""
    return _fill(template.stop, tokenizer)


def stop_token_ids(tokenizer: Any, template_name: str | None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the template's end-of-turn token."""
    text = stop_text(load_template(template_name), tokenizer)
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(text) if text else None}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


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

    inline = bool(template.user_with_system)
    return "".join([
        "{%- set ns = namespace(system=" + json.dumps(template.default_system) .replace("null", "none") + ") -%}",
        "{%- set msgs = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- set msgs = messages[1:] -%}{%- endif -%}",
        expr(template.prefix),
        "{%- if ns.system -%}" + ("" if inline else expr(template.system).replace("m['content']", "ns.system")) + "{%- endif -%}",
        "{%- for m in msgs -%}",
        "{%- if m['role'] == 'user' -%}",
        ("{%- if ns.system and loop.first -%}" + expr(template.user_with_system) + "{%- else -%}" + expr(template.user)
         + "{%- endif -%}") if inline else expr(template.user),
        "{%- elif m['role'] == 'assistant' -%}", expr(template.assistant), expr(template.separator),
        "{%- endif -%}{%- endfor -%}",
    ])
