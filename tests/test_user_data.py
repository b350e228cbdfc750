"""The data people already have, used with config only: group files outside the package, column
and role maps on the command line, other tools' layouts (LLaMA-Factory, axolotl, OpenAI), tool
calls, reasoning, raw corpora. Each layout is a small file written here in that tool's documented
shape; expected records and masks are written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftune.config.compose import compose
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
from ftune.config.schema import DatasetConfig, SourceConfig  # noqa: E402
from ftune.data import formats, templates  # noqa: E402
from ftune.data.build import build, split_records, tokenize_records  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402


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
    data = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}])
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
