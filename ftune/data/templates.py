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
    reasoning: str = ""
    """An assistant turn's reasoning before its answer, e.g. "<think>\\n{content}\\n</think>\\n\\n"
    (only the last assistant turn's is rendered, as reasoning models' own templates do)."""
    tools: str = ""
    """The system prompt when the row offers tools: {system} is the row's system prompt, {content}
    the tools' JSON schemas, one a line."""
    tool_call: str = ""
    """One call inside an assistant turn; {content} is {"name": …, "arguments": {…}} as JSON."""
    tool: str = ""
    """A tool's result turn (masked), ending where the assistant's next turn starts."""


@dataclass(frozen=True)
class RenderOptions:
    """What the dataset config changes in rendering: no_default_system (dataset.system="": a
    template's default system prompt is not inserted) and train_reasoning."""

    no_default_system: bool = False
    train_reasoning: bool = True

    @classmethod
    def of(cls, dataset: Any) -> "RenderOptions":
        return cls(no_default_system=getattr(dataset, "system", None) == "",
                   train_reasoning=getattr(dataset, "train_reasoning", True))


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


def _call_json(call: dict) -> str:
    return json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]}, ensure_ascii=False)


def _needs(template: Template, part: str, why: str) -> str:
    value = getattr(template, part)
    if not value:
        raise FtuneError(f"template '{template.name}' has no '{part}' format, and {why}",
                         hint="Use dataset.template=model (the tokenizer's own chat template, rendered with the "
                              "tools) or a template file with reasoning/tools/tool_call/tool parts "
                              "(data_templates/chatml.yaml has them).")
    return value


def _last_assistant(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)


def render_named(template: Template, messages: list[dict], tokenizer: Any, tools: list[dict] | None = None,
                 opts: RenderOptions = RenderOptions()) -> list[Segment]:
    system = None if opts.no_default_system else template.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if tools:
        fmt = _needs(template, "tools", "the row offers tools")
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = _fill(fmt, tokenizer, system=system or "", content=listing).lstrip("\n")
    segments = [Segment(_fill(template.prefix, tokenizer), False)]
    use_inline_system = bool(system and template.user_with_system)
    if system and not use_inline_system:
        segments.append(Segment(_fill(template.system, tokenizer, content=system), False))
    turn, last = 0, _last_assistant(messages)
    for i, message in enumerate(messages):
        if message["role"] == "user":
            fmt = template.user_with_system if (use_inline_system and i == 0) else template.user
            segments.append(Segment(_fill(fmt, tokenizer, content=message["content"], system=system or ""),
                                    message.get("train", False), turn if message.get("train") else -1))
        elif message["role"] == "assistant":
            train = message.get("train", True)
            if message.get("reasoning") and i == last:
                fmt = _needs(template, "reasoning", "the answer carries reasoning")
                segments.append(Segment(_fill(fmt, tokenizer, content=message["reasoning"]),
                                        train and opts.train_reasoning, turn))
            body = message["content"]
            if message.get("tool_calls"):
                fmt = _needs(template, "tool_call", "the answer calls tools")
                calls = "\n".join(_fill(fmt, tokenizer, content=_call_json(c)) for c in message["tool_calls"])
                body = f"{body}\n{calls}" if body else calls
            segments.append(Segment(_fill(template.assistant, tokenizer, content=body), train, turn))
            segments.append(Segment(_fill(template.separator, tokenizer), False))
            turn += 1
        elif message["role"] == "tool":
            fmt = _needs(template, "tool", "the conversation has tool results")
            segments.append(Segment(_fill(fmt, tokenizer, content=message["content"]), False))
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


def chat_message(message: dict) -> dict:
    """A canonical message in the shape chat templates read (reasoning as reasoning_content)."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    if message.get("reasoning"):
        out["reasoning_content"] = message["reasoning"]
    if message.get("name"):
        out["name"] = message["name"]
    return out


_DEFAULT_SYSTEM: dict[tuple[int, str, str], tuple[str, str]] = {}


def default_system_block(tokenizer: Any) -> tuple[str, str]:
    """(the block the tokenizer's chat template inserts when a conversation has no system message,
    the default prompt in it); ("", "") when it inserts none. Found once per tokenizer and template
    (every row of a dataset asks) by rendering one user turn with and without a system prompt: the
    system block ends with the end-of-turn (EOS) token."""
    key = (id(tokenizer), str(tokenizer.chat_template), str(tokenizer.eos_token))
    if key not in _DEFAULT_SYSTEM:
        _DEFAULT_SYSTEM[key] = _find_default_system(tokenizer)
    return _DEFAULT_SYSTEM[key]


def _find_default_system(tokenizer: Any) -> tuple[str, str]:
    probe, marker = "\x02probe\x02", "\x03system\x03"
    plain = apply_chat_template(tokenizer, [{"role": "user", "content": probe}], tokenize=False)
    with_system = apply_chat_template(tokenizer, [{"role": "system", "content": marker},
                                                  {"role": "user", "content": probe}], tokenize=False)
    if marker not in with_system or probe not in plain:
        return "", ""
    before, after = with_system[:with_system.index(probe)].split(marker, 1)
    head = plain[:plain.index(probe)]
    if not (head.startswith(before) and head.endswith(after) and len(head) > len(before) + len(after)):
        return "", ""
    default = head[len(before):len(head) - len(after)]
    eos = tokenizer.eos_token or ""
    if not eos or eos not in after:
        return "?", default  # a default exists but its block's end cannot be told from the user turn
    cut = after.index(eos) + len(eos)
    while cut < len(after) and after[cut] == "\n":
        cut += 1
    return before + default + after[:cut], default


def _drop_default_system(segments: list[Segment], tokenizer: Any) -> None:
    """dataset.system="": the default system prompt block leaves the first (masked) segment."""
    block, default = default_system_block(tokenizer)
    if not block:
        return
    text = segments[0].text if segments and not segments[0].train else ""
    if block == "?" or block not in text:
        raise FtuneError("dataset.system=\"\": the chat template inserts a default system prompt that cannot be "
                         f"taken out of its text ({default[:80]!r})",
                         hint="Set dataset.system to a system prompt of your own, or use a named template "
                              "(dataset.template=chatml).")
    segments[0] = Segment(text.replace(block, "", 1), False)


EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*")


def _split_reasoning(segment: Segment, message: dict, opts: RenderOptions) -> list[Segment]:
    """An assistant segment as [reasoning part][answer]: an empty <think></think> block a template
    inserts is masked (it is not the model's content); reasoning is masked with train_reasoning=false."""
    text = segment.text
    empty = EMPTY_THINK.match(text)
    if empty and not message.get("reasoning"):
        return [Segment(text[:empty.end()], False), Segment(text[empty.end():], segment.train, segment.turn)]
    reasoning = message.get("reasoning")
    if reasoning and reasoning in text:
        cut = text.index(reasoning) + len(reasoning)
        close = text.find("</think>", cut)
        cut = close + len("</think>") if close >= 0 else cut
        while cut < len(text) and text[cut] in "\n ":
            cut += 1
        keep = segment.train and opts.train_reasoning
        return [Segment(text[:cut], keep, segment.turn if keep else -1), Segment(text[cut:], segment.train, segment.turn)]
    return [segment]


def render_model(messages: list[dict], tokenizer: Any, tools: list[dict] | None = None,
                 opts: RenderOptions = RenderOptions()) -> list[Segment]:
    if not getattr(tokenizer, "chat_template", None):
        raise FtuneError("dataset.template=model, but the tokenizer has no chat template",
                         hint="Pick a named template, e.g. dataset.template=chatml.")
    hf = [chat_message(m) for m in messages]
    extra = {"tools": tools} if tools else {}
    try:
        segments = _growing_prefix(hf, messages, tokenizer, extra)
    except _NotPrefix:
        segments = _by_prompts(hf, messages, tokenizer, extra)
    _check_rendered("".join(seg.text for seg, _ in segments), messages, tools)
    out = []
    for seg, message in segments:
        out += _split_reasoning(seg, message, opts) if message is not None and message["role"] == "assistant" else [seg]
    if opts.no_default_system and not (messages and messages[0]["role"] == "system"):
        _drop_default_system(out, tokenizer)
    return [s for s in out if s.text]


def _check_rendered(text: str, messages: list[dict], tools: list[dict] | None) -> None:
    """A chat template that does not render tools, calls or the final answer's reasoning would train
    the row without them: refuse, naming what is lost."""
    lost = []
    if tools and not any(t["function"]["name"] in text for t in tools):
        lost.append("the tools offered (tools=)")
    if any(c["function"]["name"] not in text for m in messages for c in m.get("tool_calls") or []):
        lost.append("the assistant's tool calls")
    last = _last_assistant(messages)
    if last >= 0 and messages[last].get("reasoning") and messages[last]["reasoning"] not in text:
        lost.append("the answer's reasoning (reasoning_content)")
    if lost:
        raise FtuneError(f"the model's chat template does not render {' or '.join(lost)}: the row would train "
                         "without them",
                         hint="Use a named template that has them (dataset.template=chatml renders tools, calls and "
                              "<think> reasoning), or a template file of your own.")


class _NotPrefix(Exception):
    pass


def _growing_prefix(hf: list[dict], messages: list[dict], tokenizer: Any, extra: dict) -> list[tuple[Segment, Any]]:
    """Render the conversation one message longer at a time: the text each message adds is its
    segment (trained for assistant turns)."""
    segments, done, turn = [], "", 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = apply_chat_template(tokenizer, hf[:i], tokenize=False, add_generation_prompt=True, **extra)
            segments.append((_piece(done, prompt, False, turn), None))
            done = prompt
        text = apply_chat_template(tokenizer, hf[: i + 1], tokenize=False, **extra)
        is_answer = message["role"] == "assistant"
        train = message.get("train", is_answer)
        segments.append((_piece(done, text, train, turn), message))
        done = text
        turn += is_answer
    return segments


def _by_prompts(hf: list[dict], messages: list[dict], tokenizer: Any, extra: dict) -> list[tuple[Segment, Any]]:
    """For templates that render earlier turns differently once a later turn exists (reasoning
    models drop earlier turns' thinking): the whole conversation once, each answer starting where
    the prompt up to it ends and running to the end-of-turn token."""
    full = apply_chat_template(tokenizer, hf, tokenize=False, **extra)
    stop = tokenizer.eos_token or ""
    segments, pos, turn = [], 0, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = apply_chat_template(tokenizer, hf[:i], tokenize=False, add_generation_prompt=True, **extra)
        end = full.find(stop, len(prompt)) if stop else -1
        if not full.startswith(prompt) or len(prompt) < pos or end < 0:
            raise FtuneError("the tokenizer's chat template does not render a conversation as a growing prefix, so "
                             "prompt and answer tokens cannot be told apart",
                             hint="Use a named template instead, e.g. dataset.template=chatml.")
        end += len(stop)
        segments.append((Segment(full[pos:len(prompt)], False), None))
        segments.append((Segment(full[len(prompt):end], message.get("train", True), turn), message))
        pos, turn = end, turn + 1
    segments.append((Segment(full[pos:], False), None))
    return segments


def _piece(done: str, text: str, train: bool, turn: int) -> Segment:
    if not text.startswith(done):
        raise _NotPrefix
    return Segment(text[len(done):], train, turn if train else -1)


def render(record: dict, template: Template | None, tokenizer: Any, opts: RenderOptions = RenderOptions()
           ) -> list[Segment]:
    """Segments for one canonical record. Raw text is trained whole, with EOS appended."""
    if "text" in record:
        return [Segment(record["text"] + (tokenizer.eos_token or ""), True, 0)]
    if template is None:
        return render_model(record["messages"], tokenizer, record.get("tools"), opts)
    return render_named(template, record["messages"], tokenizer, record.get("tools"), opts)


def render_prompt(messages: list[dict], template: Template | None, tokenizer: Any,
                  opts: RenderOptions = RenderOptions(), tools: list[dict] | None = None) -> str:
    """The text a model continues to answer `messages` (which end with a user turn)."""
    if template is None:
        text = apply_chat_template(tokenizer, [chat_message(m) for m in messages], tokenize=False,
                                   add_generation_prompt=True, **({"tools": tools} if tools else {}))
        if opts.no_default_system and not (messages and messages[0]["role"] == "system"):
            segments = [Segment(text, False)]
            _drop_default_system(segments, tokenizer)
            text = segments[0].text
        return text
    return "".join(s.text for s in render_named(template, messages, tokenizer, tools, opts))


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
