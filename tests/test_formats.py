"""Row formats -> canonical records: exact records per format, column mapping, default system
prompts, and bad rows that name the row (1-based) and the column."""

from __future__ import annotations

import pytest

from ftune.data import formats
from ftune.errors import FtuneError

WHERE = "dataset.sources[0] (rows.jsonl)"


def one(row: dict, fmt: str, columns: dict | None = None, system: str | None = None) -> dict:
    records = formats.to_records([row], fmt, columns or {}, system, WHERE)
    assert len(records) == 1
    return records[0]


def sys_(c: str) -> dict:
    return {"role": "system", "content": c}


def user(c: str) -> dict:
    return {"role": "user", "content": c}


def bot(c: str) -> dict:
    return {"role": "assistant", "content": c}


def test_formats_cover_every_converter():
    assert set(formats.FORMATS) == {"text", "alpaca", "qa", "messages", "sharegpt", "preference", "prompt", "feedback"}
    assert set(formats.CONVERTERS) == set(formats.FORMATS)


# ----------------------------------------------------------------------------- prompt (PPO)
def test_prompt_rows_as_text_or_messages_with_an_optional_reference():
    assert one({"prompt": "2+2?", "reference": "4"}, "prompt") == {"messages": [{"role": "user", "content": "2+2?"}],
                                                                  "reference": "4"}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert one({"prompt": msgs}, "prompt") == {"messages": msgs}
    with pytest.raises(FtuneError, match="must end with a user message"):
        one({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "prompt")


# ----------------------------------------------------------------------------- text
def test_text():
    assert one({"text": "Hello world.\nSecond line.", "id": 7}, "text") == {"text": "Hello world.\nSecond line."}


def test_text_ignores_default_system():
    assert one({"text": "raw"}, "text", system="Be brief.") == {"text": "raw"}


# ----------------------------------------------------------------------------- alpaca
def test_alpaca_minimal():
    assert one({"instruction": "Sort 3 1 2", "output": "1 2 3"}, "alpaca") == {
        "messages": [user("Sort 3 1 2"), bot("1 2 3")]}


def test_alpaca_with_input_joins_with_blank_line():
    row = {"instruction": "Reverse the word.", "input": "hello", "output": "olleh"}
    assert one(row, "alpaca") == {"messages": [user("Reverse the word.\n\nhello"), bot("olleh")]}


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_alpaca_blank_input_is_left_out(blank):
    row = {"instruction": "Say hi.", "input": blank, "output": "hi"}
    assert one(row, "alpaca") == {"messages": [user("Say hi."), bot("hi")]}


def test_alpaca_system_and_history():
    row = {"instruction": "And Italy?", "input": "", "output": "Rome.", "system": "Be brief.",
           "history": [["Capital of France?", "Paris."], ["Capital of Spain?", "Madrid."]]}
    assert one(row, "alpaca") == {"messages": [
        sys_("Be brief."),
        user("Capital of France?"), bot("Paris."),
        user("Capital of Spain?"), bot("Madrid."),
        user("And Italy?"), bot("Rome."),
    ]}


def test_alpaca_history_as_tuples():
    row = {"instruction": "b", "output": "B", "history": [("a", "A")]}
    assert one(row, "alpaca") == {"messages": [user("a"), bot("A"), user("b"), bot("B")]}


def test_alpaca_default_system_from_source():
    row = {"instruction": "Hi", "output": "Hello"}
    assert one(row, "alpaca", system="You are kind.") == {"messages": [sys_("You are kind."), user("Hi"), bot("Hello")]}


def test_alpaca_row_system_beats_source_default():
    row = {"instruction": "Hi", "output": "Hello", "system": "Row system."}
    assert one(row, "alpaca", system="Source system.") == {
        "messages": [sys_("Row system."), user("Hi"), bot("Hello")]}


def test_alpaca_columns_mapping():
    row = {"prompt": "Convert 2 km to metres.", "completion": "2000 metres.", "extra": 1}
    cols = {"instruction": "prompt", "output": "completion"}
    assert one(row, "alpaca", cols) == {"messages": [user("Convert 2 km to metres."), bot("2000 metres.")]}


def test_columns_mapping_does_not_touch_the_input_row():
    row = {"prompt": "p", "completion": "c"}
    formats.to_records([row], "alpaca", {"instruction": "prompt", "output": "completion"}, None, WHERE)
    assert row == {"prompt": "p", "completion": "c"}


def test_map_columns():
    assert formats.map_columns({"q": "x", "a": "y"}, {"question": "q", "answer": "a"}) == {
        "q": "x", "a": "y", "question": "x", "answer": "y"}
    row = {"a": 1}
    assert formats.map_columns(row, {}) is row


# ----------------------------------------------------------------------------- qa
def test_qa():
    assert one({"question": "2 + 2?", "answer": "4"}, "qa") == {"messages": [user("2 + 2?"), bot("4")]}


def test_qa_with_row_system_and_default_system():
    assert one({"question": "q", "answer": "a", "system": "S"}, "qa") == {
        "messages": [sys_("S"), user("q"), bot("a")]}
    assert one({"question": "q", "answer": "a"}, "qa", system="D") == {
        "messages": [sys_("D"), user("q"), bot("a")]}


def test_qa_columns_mapping():
    row = {"Q": "Capital of France?", "A": "Paris."}
    assert one(row, "qa", {"question": "Q", "answer": "A"}) == {
        "messages": [user("Capital of France?"), bot("Paris.")]}


# ----------------------------------------------------------------------------- messages
def test_messages_passthrough():
    msgs = [sys_("S"), user("u1"), bot("a1"), user("u2"), bot("a2")]
    row = {"messages": [dict(m, extra="ignored") for m in msgs]}
    assert one(row, "messages") == {"messages": msgs}


def test_messages_default_system_inserted_only_when_missing():
    assert one({"messages": [user("u"), bot("a")]}, "messages", system="D") == {
        "messages": [sys_("D"), user("u"), bot("a")]}
    assert one({"messages": [sys_("own"), user("u"), bot("a")]}, "messages", system="D") == {
        "messages": [sys_("own"), user("u"), bot("a")]}


def test_messages_roles_are_case_insensitive():
    row = {"messages": [{"role": "User", "content": "u"}, {"role": "ASSISTANT", "content": "a"}]}
    assert one(row, "messages") == {"messages": [user("u"), bot("a")]}


def test_messages_columns_mapping():
    row = {"chat": [user("u"), bot("a")]}
    assert one(row, "messages", {"messages": "chat"}) == {"messages": [user("u"), bot("a")]}


# ----------------------------------------------------------------------------- sharegpt
def test_sharegpt_role_aliases():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u1"},
                             {"from": "gpt", "value": "a1"}, {"from": "user", "value": "u2"},
                             {"from": "assistant", "value": "a2"}, {"from": "Human", "value": "u3"},
                             {"from": "chatgpt", "value": "a3"}]}
    assert one(row, "sharegpt") == {"messages": [sys_("S"), user("u1"), bot("a1"), user("u2"), bot("a2"),
                                                 user("u3"), bot("a3")]}


def test_sharegpt_default_system_and_row_system():
    conv = [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]
    assert one({"conversations": conv}, "sharegpt") == {"messages": [user("u"), bot("a")]}
    assert one({"conversations": conv}, "sharegpt", system="D") == {"messages": [sys_("D"), user("u"), bot("a")]}
    assert one({"conversations": conv, "system": "R"}, "sharegpt", system="D") == {
        "messages": [sys_("R"), user("u"), bot("a")]}
    own = [{"from": "system", "value": "own"}, *conv]
    assert one({"conversations": own}, "sharegpt", system="D") == {"messages": [sys_("own"), user("u"), bot("a")]}


def test_sharegpt_columns_mapping():
    row = {"dialog": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}
    assert one(row, "sharegpt", {"conversations": "dialog"}) == {"messages": [user("u"), bot("a")]}


# ----------------------------------------------------------------------------- several rows
def test_to_records_keeps_row_order():
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    assert formats.to_records(rows, "qa", {}, None, WHERE) == [
        {"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(5)]


# ----------------------------------------------------------------------------- bad rows
GOOD_ALPACA = {"instruction": "i", "output": "o"}


def bad(rows: list[dict], fmt: str, columns: dict | None = None) -> FtuneError:
    with pytest.raises(FtuneError) as info:
        formats.to_records(rows, fmt, columns or {}, None, WHERE)
    return info.value


def test_alpaca_missing_output_names_row_and_column():
    err = bad([GOOD_ALPACA, GOOD_ALPACA, {"instruction": "no answer"}], "alpaca")
    assert err.title == f"{WHERE}, row 3: column 'output' is missing or empty"
    assert "row 3" in str(err) and "'output'" in str(err)
    # required and optional columns told apart (an optional one listed as expected misleads)
    assert "format=alpaca needs instruction, output; optional: input, system, history" in err.problems
    assert any(p == "the row has columns: instruction" for p in err.problems)
    assert "columns" in (err.hint or "")


def test_alpaca_missing_instruction_row_1():
    err = bad([{"output": "o"}, GOOD_ALPACA], "alpaca")
    assert err.title == f"{WHERE}, row 1: column 'instruction' is missing or empty"


def test_alpaca_nan_cell_counts_as_missing():
    err = bad([GOOD_ALPACA, {"instruction": "i", "output": float("nan")}], "alpaca")
    assert "row 2" in err.title and "'output'" in err.title


def test_unmapped_column_is_reported():
    # The file calls it "completion" but the mapping points at a column that does not exist.
    err = bad([{"prompt": "p", "completion": "c"}], "alpaca", {"instruction": "prompt", "output": "answer"})
    assert "row 1" in err.title and "'output'" in err.title
    assert "the row has columns: completion, prompt" in err.problems


def test_alpaca_non_string_output():
    err = bad([GOOD_ALPACA, {"instruction": "i", "output": 42}], "alpaca")
    assert err.title == f"{WHERE}, row 2: column 'output' must be text (got int)"


@pytest.mark.parametrize("history", ["not a list", [["only one"]], [["a", 1]], [{"a": "b"}]])
def test_alpaca_bad_history(history):
    err = bad([{"instruction": "i", "output": "o", "history": history}], "alpaca")
    assert "row 1" in err.title and "'history'" in err.title


def test_text_missing_and_blank():
    assert "row 2" in bad([{"text": "ok"}, {"body": "x"}], "text").title
    assert "'text'" in bad([{"body": "x"}], "text").title
    err = bad([{"text": "ok"}, {"text": "ok"}, {"text": "   \n"}], "text")
    assert err.title == f"{WHERE}, row 3: column 'text' is empty"


def test_qa_missing_answer():
    err = bad([{"question": "q", "answer": "a"}, {"question": "q"}], "qa")
    assert err.title == f"{WHERE}, row 2: column 'answer' is missing or empty"


def test_messages_unknown_role():
    rows = [{"messages": [user("u"), bot("a")]}, {"messages": [user("u"), {"role": "bot", "content": "a"}]}]
    err = bad(rows, "messages")
    assert err.title.startswith(f"{WHERE}, row 2: messages[1].role='bot' is not one of assistant, ")
    assert "map it with dataset.sources[i].roles, e.g. {assistant: bot}" in err.title


def test_messages_without_assistant_turn():
    err = bad([{"messages": [sys_("S"), user("u")]}], "messages")
    assert err.title == f"{WHERE}, row 1: the conversation has no assistant turn to train on"


def test_messages_non_string_content():
    err = bad([{"messages": [user("u"), {"role": "assistant", "content": ["a"]}]}], "messages")
    assert err.title == f"{WHERE}, row 1: messages[1].content must be text (got a list of 1)"


@pytest.mark.parametrize("value", [None, [], "text", {"role": "user"}])
def test_messages_column_not_a_list_of_turns(value):
    err = bad([{"messages": value}], "messages")
    assert "row 1" in err.title and "'messages'" in err.title


def test_messages_turn_without_content():
    err = bad([{"messages": [{"role": "user"}]}], "messages")
    assert err.title == (f"{WHERE}, row 1: messages[0] must have 'role' and 'content' (got an object with keys "
                         "role; map other keys with dataset.sources[i].message_keys)")


def test_sharegpt_errors():
    good = {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}
    err = bad([good, good, {"conversations": [{"from": "human", "value": "u"}, {"from": "robot", "value": "a"}]}],
              "sharegpt")
    assert err.title.startswith(f"{WHERE}, row 3: conversations[1].from='robot' is not one of ")
    assert "gpt" in err.title and "human" in err.title
    err = bad([{"conversations": [{"from": "human", "value": "u"}]}], "sharegpt")
    assert err.title == f"{WHERE}, row 1: the conversation has no assistant turn to train on"
    err = bad([{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}], "sharegpt")
    assert err.title == f"{WHERE}, row 1: conversations[0].value must be text (got int)"
    err = bad([{"messages": []}], "sharegpt")
    assert "row 1" in err.title and "'conversations'" in err.title
    assert "the row has columns: messages" in err.problems


def test_row_error_is_not_leaked_as_plain_value_error():
    with pytest.raises(FtuneError) as info:
        formats.to_records([{}], "qa", {}, None, WHERE)
    assert not isinstance(info.value, ValueError)
    assert "the row has columns: none" in info.value.problems
