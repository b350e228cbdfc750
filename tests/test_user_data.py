"""The data people already have, used with config only: group files outside the package, column
and role maps on the command line, other tools' layouts (LLaMA-Factory, axolotl, OpenAI), tool
calls, reasoning, raw corpora. Each layout is a small file written here in that tool's documented
shape; expected records and masks are written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftune.config.compose import compose
from ftune.config.schema import DatasetConfig, SourceConfig
from ftune.data import formats, sources, templates
from ftune.data.build import build, split_records, tokenize_records
from ftune.data.jinja import to_jinja
from ftune.data.tokenize import IGNORE
from ftune.errors import FtuneError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


QA = [{"q": "What is 2+2?", "a": "4"}, {"q": "Capital of Peru?", "a": "Lima"}, {"q": "Capital of France?", "a": "Paris"}]


# ----------------------------------------------------------------------------- group files outside the package
def test_dataset_file_outside_the_package(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    (tmp_path / "my-data.yaml").write_text(
        f"name: my-data\nsources:\n  - path: {data}\n    format: qa\n    columns: {{question: q, answer: a}}\nmax_seq_len: 128\n")
    cfg = compose([f"dataset={tmp_path / 'my-data.yaml'}"]).cfg
    assert cfg.dataset.name == "my-data" and cfg.dataset.max_seq_len == 128
    assert cfg.dataset.sources[0].path == str(data) and dict(cfg.dataset.sources[0].columns) == {"question": "q", "answer": "a"}
    assert cfg.dataset.eval_fraction == 0.1  # the schema's default fills what the file leaves out


def test_every_group_takes_a_file(tmp_path):
    (tmp_path / "m.yaml").write_text("name: lora\nr: 4\nalpha: 8\n")
    (tmp_path / "s.yaml").write_text("name: sft\n")
    (tmp_path / "h.yaml").write_text("name: mine\nprecision: fp32\n")
    cfg = compose([f"method={tmp_path / 'm.yaml'}", f"stage={tmp_path / 's.yaml'}", f"hardware={tmp_path / 'h.yaml'}"]).cfg
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha) == ("lora", 4, 8)
    assert cfg.hardware.name == "mine" and cfg.hardware.precision == "fp32" and cfg.stage.name == "sft"


def test_group_file_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FtuneError, match="does not exist"):
        compose([f"dataset={tmp_path / 'nope.yaml'}"])
    (tmp_path / "m.yaml").write_text("r: 4\n")
    with pytest.raises(FtuneError, match="no 'name' key") as err:
        compose([f"method={tmp_path / 'm.yaml'}"])
    assert "name: " in err.value.hint
    (tmp_path / "m.yaml").write_text("name: lroa\n")
    with pytest.raises(FtuneError, match=r"m.yaml: name: unknown method 'lroa'.*Did you mean 'lora'"):
        compose([f"method={tmp_path / 'm.yaml'}"])
    (tmp_path / "d.yaml").write_text("name: x\nsources: [{path: a.jsonl}]\nmax_seq_lenn: 3\n")
    with pytest.raises(FtuneError, match="max_seq_lenn"):
        compose([f"dataset={tmp_path / 'd.yaml'}"])


# ----------------------------------------------------------------------------- free maps on the command line
def test_columns_set_on_the_command_line(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = compose([f"dataset.sources.0.path={data}", "dataset.sources.0.format=qa",
                   "dataset.sources.0.columns.question=q", "dataset.sources.0.columns.answer=a"]).cfg
    assert dict(cfg.dataset.sources[0].columns) == {"question": "q", "answer": "a"}


def test_columns_naming_no_field_of_the_format_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(FtuneError) as err:
        compose([f"dataset.sources.0.path={data}", "dataset.sources.0.format=qa", "dataset.sources.0.columns.q=question"])
    text = str(err.value)
    assert "dataset.sources[0].columns: 'q: question' is the other way round; write 'question: q'" in text
    with pytest.raises(FtuneError, match=r"columns: 'prompt' is not a field of format=qa \(its fields: question, answer"):
        compose([f"dataset.sources.0.path={data}", "dataset.sources.0.format=qa", "dataset.sources.0.columns.prompt=q"])


# ----------------------------------------------------------------------------- conversations: keys and roles


def records(rows: list[dict], fmt: str, **source) -> list[dict]:
    layout = formats.Layout(source.pop("message_keys", {}), source.pop("roles", {}))
    return formats.to_records(rows, fmt, source.pop("columns", {}), source.pop("system", None), "src", layout=layout)


def user(c):
    return {"role": "user", "content": c}


def bot(c, **extra):
    return {"role": "assistant", "content": c, **extra}


def test_axolotl_style_keys_and_roles():
    """axolotl's message_property_mappings / roles, LLaMA-Factory's role_tag/content_tag/user_tag…"""
    row = {"dialog": [{"speaker": "customer", "text": "My order is late."}, {"speaker": "agent", "text": "Sorry!"}]}
    got = records([row], "sharegpt", columns={"conversations": "dialog"},
                  message_keys={"role": "speaker", "content": "text"}, roles={"user": "customer", "assistant": ["agent", "bot"]})
    assert got == [{"messages": [user("My order is late."), bot("Sorry!")]}]


def test_either_key_set_is_read_in_either_layout():
    # LLaMA-Factory's sharegpt layout with OpenAI tags, and OpenAI messages written with from/value
    conv = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert records([{"conversations": conv}], "sharegpt") == [{"messages": [user("u"), bot("a")]}]
    conv = [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]
    assert records([{"messages": conv}], "messages") == [{"messages": [user("u"), bot("a")]}]


def test_unknown_role_names_the_fix():
    with pytest.raises(FtuneError, match=r"conversations\[1\].from='agent' is not one of .*roles, e.g. \{assistant: agent\}"):
        records([{"conversations": [{"from": "human", "value": "u"}, {"from": "agent", "value": "a"}]}], "sharegpt")


def test_message_keys_and_roles_are_checked_in_the_config(tmp_path):
    conv = [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]
    data = write_jsonl(tmp_path / "c.jsonl", [{"conversations": conv}])
    base = [f"dataset.sources.0.path={data}", "dataset.sources.0.format=sharegpt"]
    cfg = compose([*base, "dataset.sources.0.roles.assistant=agent", "dataset.sources.0.message_keys.role=speaker"]).cfg
    assert dict(cfg.dataset.sources[0].roles) == {"assistant": "agent"}
    with pytest.raises(FtuneError, match=r"roles: 'asistant' is not one of .*Did you mean 'assistant'"):
        compose([*base, "dataset.sources.0.roles.asistant=agent"])
    with pytest.raises(FtuneError, match=r"message_keys: 'contents' is not one of role, content"):
        compose([*base, "dataset.sources.0.message_keys.contents=text"])


# ----------------------------------------------------------------------------- other tools' preference layouts
def test_llamafactory_ranking_layouts():
    # sharegpt ranking: conversations + chosen/rejected as one message object each
    row = {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
           "rejected": {"from": "gpt", "value": "5"}}
    assert records([row], "preference") == [{"messages": [user("2+2?")], "chosen": "4", "rejected": "5"}]
    # alpaca ranking: instruction/input + chosen/rejected text
    row = {"instruction": "Add.", "input": "2+2", "chosen": "4", "rejected": "5"}
    assert records([row], "preference") == [{"messages": [user("Add.\n\n2+2")], "chosen": "4", "rejected": "5"}]


def test_preference_errors_say_what_was_found():
    with pytest.raises(FtuneError) as err:
        records([{"prompt": "q", "chosen": {"text": "4"}, "rejected": "5"}], "preference")
    assert "chosen[0] must have 'role' and 'content' (got an object with keys text" in str(err.value)
    assert ("format=preference needs chosen, rejected, and a prompt (prompt, conversations, messages or instruction) "
            "unless chosen and rejected are whole conversations; optional: system") in str(err.value)


def test_llamafactory_kto_layout():
    """LLaMA-Factory's KTO demo: messages ending in the answer, plus a true/false tag column."""
    rows = [{"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}], "kto_tag": True},
            {"messages": [{"content": "2+2?", "role": "user"}, {"content": "5", "role": "assistant"}], "kto_tag": False}]
    got = records(rows, "feedback", columns={"label": "kto_tag"})
    assert got == [{"messages": [user("Hi")], "completion": "Hello!", "label": True},
                   {"messages": [user("2+2?")], "completion": "5", "label": False}]


# ----------------------------------------------------------------------------- tokenised: masks and notes
def dataset(path: Path, fmt: str, **kw) -> DatasetConfig:
    source = {k: kw.pop(k) for k in ("columns", "message_keys", "roles") if k in kw}
    return DatasetConfig(name="t", sources=[SourceConfig(path=str(path), format=fmt, **source)],
                         template=kw.pop("template", "chatml"), eval_fraction=0.0, **{"max_seq_len": 256, **kw})


def tokenised(rows: list[dict], fmt: str, tok, tmp_path: Path, **kw) -> tuple[list[dict], object]:
    cfg = dataset(write_jsonl(tmp_path / "rows.jsonl", rows), fmt, **kw)
    train, _ = split_records(cfg, 0)
    return tokenize_records(train, cfg, tok)


def trained(sample: dict, tok) -> str:
    return tok.decode([t for i, (t, lab) in enumerate(zip(sample["input_ids"], sample["labels"]))
                       if lab != IGNORE and i > 0])


def masked(sample: dict, tok) -> str:
    return tok.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == IGNORE])


def test_per_turn_train_flags_are_honoured(tiny_tokenizer, tmp_path):
    row = {"messages": [user("hello"), bot("wrong answer", train=False), user("again"), bot("right answer")]}
    (sample,), _ = tokenised([row], "messages", tiny_tokenizer, tmp_path)
    assert "right answer" in trained(sample, tiny_tokenizer) and "wrong" not in trained(sample, tiny_tokenizer)
    assert "wrong answer" in masked(sample, tiny_tokenizer)
    # axolotl writes the flag as "training"; a user turn flagged true is trained too
    row = {"messages": [{"role": "user", "content": "hello", "training": True}, {**bot("world"), "training": 1}]}
    (sample,), _ = tokenised([row], "messages", tiny_tokenizer, tmp_path)
    assert "hello" in trained(sample, tiny_tokenizer) and "world" in trained(sample, tiny_tokenizer)


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                 "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tiny_tokenizer_with(model_dir: Path, chat_template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = chat_template
    return tok


@pytest.fixture()
def smol_like(tiny_model_dir):
    """The tiny tokenizer with a template that inserts a default system prompt, as SmolLM2's does."""
    return _tiny_tokenizer_with(tiny_model_dir, SMOL_TEMPLATE)


IDENTITY = [{"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."},
            {"instruction": "What is your name?", "output": "My name is {{name}}."}]


def test_default_system_prompt_is_said_and_can_be_turned_off(smol_like, tmp_path):
    path = write_jsonl(tmp_path / "id.jsonl", IDENTITY)
    cfg = dataset(path, "alpaca", template="model")
    bundle = build(cfg, "sft", 0, smol_like, use_cache=False)
    assert any('inserts its default system prompt "You are a helpful AI assistant named SmolLM' in n and
               "into the 2 of 2 rows" in n for n in bundle.stats["notes"])
    assert "SmolLM" in masked(bundle.train[0], smol_like)
    off = build(dataset(path, "alpaca", template="model", system=""), "sft", 0, smol_like, use_cache=False)
    assert not any("system prompt" in n for n in off.stats["notes"])
    text = smol_like.decode(off.train[0]["input_ids"])
    assert "SmolLM" not in text and "system" not in text and text.startswith("<|im_start|>user\n")
    own = build(dataset(path, "alpaca", template="model", system="You are Ada."), "sft", 0, smol_like, use_cache=False)
    assert smol_like.decode(own.train[0]["input_ids"]).startswith("<|im_start|>system\nYou are Ada.<|im_end|>")
    # the prompt a trained model is asked with matches: no default block either
    prompt = templates.render_prompt([user("Who are you?")], None, smol_like, templates.RenderOptions(no_default_system=True))
    assert prompt == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"


def test_named_template_default_system_is_said_too(tiny_tokenizer, tmp_path):
    bundle = build(dataset(write_jsonl(tmp_path / "r.jsonl", IDENTITY[:1]), "alpaca", template="qwen"), "sft", 0,
                   tiny_tokenizer, use_cache=False)
    assert any("template 'qwen' inserts its default system prompt \"You are Qwen" in n for n in bundle.stats["notes"])


def test_unfilled_placeholders_are_warned_and_can_be_filled(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "id.jsonl", IDENTITY)
    bundle = build(dataset(path, "alpaca"), "sft", 0, tiny_tokenizer, use_cache=False)
    assert any(n.startswith("2 of 2 rows train unfilled placeholders ({{author}}, {{name}}") and
               "dataset.placeholders.author=<text>" in n for n in bundle.stats["notes"])
    filled = build(dataset(path, "alpaca", placeholders={"name": "Ada", "author": "the lab"}), "sft", 0, tiny_tokenizer,
                   use_cache=False)
    assert not filled.stats["notes"]
    answers = sorted(trained(s, tiny_tokenizer) for s in filled.train)
    assert answers == ["I am Ada, made by the lab.<|im_end|>", "My name is Ada.<|im_end|>"]


# ----------------------------------------------------------------------------- raw corpora: no token lost
WORDS = "what is the capital of france paris answer question hello world sort these numbers reverse word".split()


def _doc(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(n))


@pytest.mark.parametrize("packing", [False, True])
def test_pretraining_keeps_every_token_of_long_documents(tiny_tokenizer, tmp_path, packing):
    docs = [_doc(i, n) for i, n in enumerate([3, 150, 40, 400])]
    cfg = dataset(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs]), "text", max_seq_len=64, packing=packing)
    bundle = build(cfg, "pt", 0, tiny_tokenizer, use_cache=False)
    eos = tiny_tokenizer.eos_token
    expected = [tiny_tokenizer(d + eos, add_special_tokens=False)["input_ids"] for d in docs]
    t = bundle.stats["train"]
    assert t["tokens_read"] == sum(len(e) for e in expected) and t["documents"] == 4
    assert t["split_documents"] == sum(len(e) > 64 for e in expected) >= 2
    assert all(len(row["input_ids"]) <= 64 for row in bundle.train)
    # every token after a document's first is a target exactly once, in order within its document
    targets = sorted((tuple(row["input_ids"][i - 1:i + 1]) for row in bundle.train for i in range(1, len(row["input_ids"]))
                      if row["labels"][i] != IGNORE), key=str)
    wanted = sorted((tuple(e[i - 1:i + 1]) for e in expected for i in range(1, len(e))), key=str)
    assert targets == wanted
    assert t["trained_tokens"] == sum(len(e) - 1 for e in expected)


def test_text_files_directories_and_globs(tiny_tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello world\n\nsecond paragraph of a\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("paris is the capital of france", encoding="utf-8")
    (folder / "notes.md").write_text("not read: not a .txt file")
    assert sources.read_rows(str(folder / "a.txt")) == [{"text": "hello world\n\nsecond paragraph of a\n"}]
    assert sources.read_rows(str(folder)) == [{"text": "hello world\n\nsecond paragraph of a\n"},
                                              {"text": "paris is the capital of france"}]
    assert sources.read_rows(str(folder / "**" / "*.txt")) == sources.read_rows(str(folder))
    assert sources.read_rows(str(tmp_path / "corpus" / "*.txt")) == [{"text": "hello world\n\nsecond paragraph of a\n"}]
    with pytest.raises(FtuneError, match="no files match"):
        sources.read_rows(str(folder / "*.jsonl"))
    cfg = compose([f"dataset.sources.0.path={folder}", "dataset.sources.0.format=text", "stage=pt"]).cfg
    assert cfg.dataset.sources[0].path == str(folder)


# ----------------------------------------------------------------------------- preference pairs: prompts cut from the left
def test_long_preference_prompt_is_cut_from_the_left(tiny_tokenizer, tmp_path):
    long_prompt = _doc(0, 300)
    rows = [{"prompt": long_prompt, "chosen": "paris", "rejected": "hello world"},
            {"prompt": "capital of france", "chosen": _doc(1, 400), "rejected": "paris"}]
    pairs, stats = tokenised(rows, "preference", tiny_tokenizer, tmp_path, max_seq_len=64)
    assert stats.prompt_truncated == 1 and stats.dropped_no_target == 1 and len(pairs) == 1
    c, r = pairs[0]["chosen"], pairs[0]["rejected"]
    assert len(c["input_ids"]) <= 64 and len(r["input_ids"]) <= 64
    assert trained(c, tiny_tokenizer) == "paris<|im_end|>" and trained(r, tiny_tokenizer) == "hello world<|im_end|>"
    # the same prompt tokens on both sides: its end (the question's last words and the assistant header)
    start = next(i for i, label in enumerate(c["labels"]) if label != IGNORE)
    pc, pr = c["input_ids"][:start], r["input_ids"][:start]
    assert pc == pr and tiny_tokenizer.decode(pc).endswith(_doc(0, 300)[-20:] + "<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- tool calls
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
OPENAI_TOOLS = {"tools": [WEATHER], "messages": [
    user("Weather in Paris?"),
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "c1"},
    bot("It is sunny in Paris.")]}
# LLaMA-Factory's function-calling demo layout: function_call/observation turns and tools as JSON text
FUNCTION_CALL = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "sunny, 21 C"},
    {"from": "gpt", "value": "It is sunny in Paris."}]}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_tool_call_layouts_give_one_record():
    openai = records([OPENAI_TOOLS], "messages")[0]
    assert openai == {"tools": [WEATHER], "messages": [
        user("Weather in Paris?"), bot("", tool_calls=[{**CALL, "id": "c1"}]),
        {"role": "tool", "content": "sunny, 21 C"}, bot("It is sunny in Paris.")]}
    lf = records([FUNCTION_CALL], "sharegpt")[0]
    assert lf == {"tools": [WEATHER], "messages": [user("Weather in Paris?"), bot("", tool_calls=[CALL]),
                                                   {"role": "tool", "content": "sunny, 21 C"},
                                                   bot("It is sunny in Paris.")]}


def test_tool_call_errors_name_the_turn():
    bad_call = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{not json"}]}
    with pytest.raises(FtuneError, match=r"conversations\[1\].value is not valid JSON"):
        records([bad_call], "sharegpt")
    with pytest.raises(FtuneError, match=r"column 'tools' must be a list of function schemas \(got int\)"):
        records([{**OPENAI_TOOLS, "tools": 3}], "messages")


def test_tool_calls_trained_and_results_masked_with_a_named_template(tiny_tokenizer, tmp_path):
    (sample,), _ = tokenised([OPENAI_TOOLS], "messages", tiny_tokenizer, tmp_path, max_seq_len=1024)
    text, train, mask = (tiny_tokenizer.decode(sample["input_ids"]), trained(sample, tiny_tokenizer),
                         masked(sample, tiny_tokenizer))
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert train == call + "It is sunny in Paris.<|im_end|>"
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in mask and "# Tools" in mask
    # the function_call layout renders to the same tokens
    (other,), _ = tokenised([FUNCTION_CALL], "sharegpt", tiny_tokenizer, tmp_path, max_seq_len=1024)
    assert other == sample


def test_template_without_a_tool_format_refuses_tool_rows(tiny_tokenizer, tmp_path):
    with pytest.raises(FtuneError, match="template 'llama3' has no 'tools' format, and the row offers tools"):
        tokenised([OPENAI_TOOLS], "messages", tiny_tokenizer, tmp_path, template="llama3")


# A Qwen3-style chat template: tools in the system turn, calls as <tool_call> JSON, results in a user
# turn, and a <think> block (empty when there is no reasoning) only on answers after the last question.
QWEN3_LIKE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}{% if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}"
    "{% endif %}{{ '# Tools\n<tools>' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}{{ '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}"
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{%- if loop.index0 > ns.last %}{{ '<think>\n' + (m.reasoning_content or '') + '\n</think>\n\n' }}{%- endif %}"
    "{{ m.content }}{%- for c in (m.tool_calls or []) %}{{ '<tool_call>\n' + ({'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson) + '\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")


@pytest.fixture()
def qwen3_like(tiny_model_dir):
    return _tiny_tokenizer_with(tiny_model_dir, QWEN3_LIKE)


def test_tool_calls_through_the_models_own_template(qwen3_like, tmp_path):
    (sample,), _ = tokenised([OPENAI_TOOLS], "messages", qwen3_like, tmp_path, template="model", max_seq_len=1024)
    text, train = qwen3_like.decode(sample["input_ids"]), trained(sample, qwen3_like)
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>\n" + json.dumps(WEATHER))
    # the tool call and the answer are trained; the empty think block the template inserts is not
    assert train == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
                     "It is sunny in Paris.<|im_end|>\n")
    assert "<think>\n\n</think>" in masked(sample, qwen3_like)


# ----------------------------------------------------------------------------- reasoning
THINKING = {"messages": [user("2+2?"), bot("4", reasoning_content="two plus two is four"),
                         user("3+3?"), bot("<think>three and three make six</think>\n6")]}


def test_reasoning_read_from_a_field_or_think_tags():
    assert records([THINKING], "messages")[0]["messages"][1::2] == [
        bot("4", reasoning="two plus two is four"), bot("6", reasoning="three and three make six")]


def test_reasoning_with_a_named_template(tiny_tokenizer, tmp_path):
    (sample,), _ = tokenised([THINKING], "messages", tiny_tokenizer, tmp_path)
    text = tiny_tokenizer.decode(sample["input_ids"])
    assert "two plus two" not in text  # earlier turns' reasoning dropped, as reasoning templates do
    assert trained(sample, tiny_tokenizer) == "4<|im_end|><think>\nthree and three make six\n</think>\n\n6<|im_end|>"
    (answer_only,), _ = tokenised([THINKING], "messages", tiny_tokenizer, tmp_path, train_reasoning=False)
    assert answer_only["input_ids"] == sample["input_ids"]
    assert trained(answer_only, tiny_tokenizer) == "4<|im_end|>6<|im_end|>"


def test_reasoning_with_a_template_that_drops_earlier_thinking(qwen3_like, tmp_path):
    (sample,), _ = tokenised([THINKING], "messages", qwen3_like, tmp_path, template="model")
    text = qwen3_like.decode(sample["input_ids"])
    assert text == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nthree and three make six\n</think>\n\n6<|im_end|>\n")
    assert trained(sample, qwen3_like) == "4<|im_end|><think>\nthree and three make six\n</think>\n\n6<|im_end|>"
    (answer_only,), _ = tokenised([THINKING], "messages", qwen3_like, tmp_path, template="model", train_reasoning=False)
    assert trained(answer_only, qwen3_like) == "4<|im_end|>6<|im_end|>"


# ----------------------------------------------------------------------------- preview and small texts
def _preview(overrides: list[str], n: int = 3) -> str:
    from rich.console import Console

    from ftune.data.preview import preview

    console = Console(record=True, width=200, color_system=None)
    preview(compose(overrides).cfg, n, console)
    return console.export_text()


def test_preview_reads_as_training_does(tiny_model_dir, tmp_path):
    rows = [{"instruction": "Salut?", "output": "Bună ziua, ș și 你好"}, {"instruction": "no answer"},
            {"instruction": "Who are you?", "output": "I am {{name}}."}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    base = [f"model.path={tiny_model_dir}", f"dataset.sources.0.path={path}", "dataset.eval_fraction=0"]
    with pytest.raises(FtuneError, match="row 2: column 'output' is missing"):
        _preview(base)
    text = _preview([*base, "dataset.on_bad_row=skip"])  # the fix the error suggests works in the preview too
    assert f"data: {path} (alpaca)" in text  # the file read, not only the dataset config's name
    assert "Bună ziua, ș și 你好" in text and "�" not in text  # multi-byte characters decoded whole
    assert "1 bad rows skipped" in text and "row 2: column 'output'" in text
    assert "2 samples from the first 2 of 2 training rows" in text
    assert "unfilled placeholders ({{name}}" in text


def test_preview_says_what_is_cut_and_inserted(tiny_model_dir, tmp_path):
    long = {"instruction": "hi", "output": " ".join(["word"] * 400)}
    path = write_jsonl(tmp_path / "long.jsonl", [long, {"instruction": "hi", "output": "hello"}])
    text = _preview([f"model.path={tiny_model_dir}", f"dataset.sources.0.path={path}", "dataset.eval_fraction=0",
                     "dataset.max_seq_len=160", "dataset.template=qwen"])
    assert "1 sample was longer than dataset.max_seq_len=160 and cut at its end" in text
    assert "template 'qwen' inserts its default system prompt" in text and "You are Qwen" in text


def test_command_txt_quotes_paths_with_spaces(tiny_overrides, tmp_path):
    import shlex

    from ftune.train.run import train

    folder = tmp_path / "my data"
    folder.mkdir()
    path = write_jsonl(folder / "rows.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)])
    train(compose([*tiny_overrides, f"dataset.sources.0.path={path}", "train.max_steps=1", "train.run_name=q"]))
    words = shlex.split((tmp_path / "outputs" / "q" / "command.txt").read_text())
    assert f"dataset.sources.0.path={path}" in words and words[:2] == ["ftune", "train"]


def test_json_error_text_reads_once(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "unterminated}\n')
    with pytest.raises(FtuneError) as err:
        sources.read_rows(str(bad))
    assert err.value.title.endswith("line 1: not valid JSON (Invalid control character at, column 31)")


def test_a_chat_template_that_ignores_tools_or_reasoning_is_refused(tiny_tokenizer, tmp_path):
    """The tiny tokenizer's ChatML template (like SmolLM2's) has no tools and no reasoning_content."""
    with pytest.raises(FtuneError, match=r"does not render the tools offered \(tools=\) or the assistant's tool calls"):
        tokenised([OPENAI_TOOLS], "messages", tiny_tokenizer, tmp_path, template="model")
    with pytest.raises(FtuneError, match=r"does not render the answer's reasoning"):
        tokenised([THINKING], "messages", tiny_tokenizer, tmp_path, template="model")


# ----------------------------------------------------------------------------- as a new user would: config only, trains
def _train(tiny_overrides: list[str], *overrides: str) -> dict:
    from ftune.train.run import train

    return train(compose([*tiny_overrides, "train.max_steps=2", "dataset.eval_fraction=0.25", *overrides]))


def test_layouts_train_with_config_only(tiny_overrides, tmp_path):
    import csv

    tools = write_jsonl(tmp_path / "tools.jsonl", [OPENAI_TOOLS, FUNCTION_CALL] * 4)
    s = _train(tiny_overrides, f"dataset.sources.0.path={tools}", "dataset.sources.0.format=messages",
               "dataset.template=chatml", "dataset.max_seq_len=512", "train.run_name=tools")
    assert s["train_tokens"] > 0
    # FUNCTION_CALL is sharegpt-shaped: a second source with its own format
    ranking = write_jsonl(tmp_path / "rank.jsonl", [
        {"conversations": [{"from": "human", "value": f"q{i}"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}} for i in range(8)])
    s = _train(tiny_overrides, "recipe=smollm2-dpo", f"dataset.sources.0.path={ranking}", "train.run_name=rank")
    assert s["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = reference at the start
    kto = write_jsonl(tmp_path / "kto.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], "kto_tag": i % 2 == 0}
        for i in range(8)])
    _train(tiny_overrides, "recipe=smollm2-dpo", "dataset=smol-feedback", "stage.loss=kto",
           f"dataset.sources.0.path={kto}", "dataset.sources.0.columns.label=kto_tag", "train.run_name=kto")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(_doc(i, 120))
    s = _train(tiny_overrides, "recipe=smollm2-lora-pt", f"dataset.sources.0.path={corpus}", "dataset.max_seq_len=64",
               "train.run_name=pt")
    stats = json.loads((tmp_path / "outputs" / "pt" / "data_stats.json").read_text())
    assert stats["train"]["documents"] + stats["eval"]["documents"] == 6
    with (tmp_path / "sys.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "system"])
        writer.writeheader()
        writer.writerows({"question": f"q{i}", "answer": f"a{i}", "system": "Answer in one word."} for i in range(8))
    _train(tiny_overrides, f"dataset.sources.0.path={tmp_path / 'sys.csv'}", "dataset.sources.0.format=qa",
           "train.run_name=csv")
    rows = json.loads((tmp_path / "outputs" / "csv" / "data_stats.json").read_text())
    assert rows["notes"] == []  # every row has its own system prompt: nothing inserted


def test_exported_chat_template_renders_tools_and_reasoning_as_trained(tiny_model_dir):
    """A merged model's chat template (to_jinja) renders tool calls, results, the tools list and the
    last answer's reasoning exactly as training did, so vLLM/llama.cpp see the trained format."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = templates.load_template("chatml")
    tok.chat_template = to_jinja(template, tok)
    for row in (OPENAI_TOOLS, THINKING, {"messages": [{"role": "system", "content": "S"}, user("u"), bot("a")]}):
        record = records([row], "messages")[0]
        trained = "".join(s.text for s in templates.render_named(template, record["messages"], tok, record.get("tools")))
        served = tok.apply_chat_template([templates.chat_message(m) for m in record["messages"]], tools=record.get("tools"),
                                         tokenize=False)
        assert served == trained


def test_a_served_run_is_asked_as_it_was_trained(tiny_model_dir, tmp_path):
    """dataset.system="" on a template that inserts a default system prompt: the served prompt
    leaves it out too."""
    import shutil

    from transformers import AutoTokenizer

    from ftune.serve.engine import AdapterPool
    from ftune.train.run import train

    model = tmp_path / "smol-like"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = SMOL_TEMPLATE
    tok.save_pretrained(model)
    common = [f"model.path={model}", "model.name=tiny", "hardware.precision=fp32", f"train.output_dir={tmp_path}",
              "train.sample_max_new_tokens=0", "train.tensorboard=false", "dataset.max_rows=8", "train.max_steps=1"]
    train(compose([*common, "dataset.system=''", "train.run_name=plain"]))
    train(compose([*common, "train.run_name=default"]))
    plain = tok.decode(AdapterPool([tmp_path / "plain"]).prompt_ids([user("hello")]))
    default = tok.decode(AdapterPool([tmp_path / "default"]).prompt_ids([user("hello")]))
    assert plain == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
