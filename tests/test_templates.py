"""Templates render conversations to the exact text of their YAML definitions, mark exactly the
assistant turns as trained, and tokenize_all turns that into the right label masks."""

from __future__ import annotations

import pytest

from ftune.data import templates
from ftune.data.jinja import to_jinja
from ftune.data.templates import Segment, load_template, render, render_prompt, stop_text
from ftune.data.tokenize import IGNORE, tokenize_all
from ftune.errors import FtuneError

BOS, EOS = "<|im_start|>", "<|im_end|>"
S = "Be brief."
U1 = "What is the capital of France?"
A1 = "Paris."
U2 = "And of Italy?"
A2 = "Rome."
MESSAGES = [{"role": "system", "content": S}, {"role": "user", "content": U1}, {"role": "assistant", "content": A1},
            {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
RECORD = {"messages": MESSAGES}

# Literal expected renderings (from data_templates/*.yaml; {bos}/{eos} -> the tiny tokenizer's tokens).
EXPECTED = {
    "alpaca": (
        "<|im_start|>"
        "Be brief.\n\n"
        "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
        "Paris.<|im_end|>"
        "\n\n"
        "### Instruction:\nAnd of Italy?\n\n### Response:\n"
        "Rome.<|im_end|>"
        "\n\n",
        ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    ),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "Paris.<|im_end|>"
        "\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
        "Rome.<|im_end|>"
        "\n",
        ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    ),
    "qwen": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "Paris.<|im_end|>"
        "\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
        "Rome.<|im_end|>"
        "\n",
        ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    ),
    "llama2": (
        "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
        " Paris. <|im_end|>"
        "<|im_start|>[INST] And of Italy? [/INST]"
        " Rome. <|im_end|>",
        [" Paris. <|im_end|>", " Rome. <|im_end|>"],
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "Paris.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "Rome.<|eot_id|>",
        ["Paris.<|eot_id|>", "Rome.<|eot_id|>"],
    ),
    "mistral": (
        "<|im_start|>"
        "[INST] Be brief.\n\nWhat is the capital of France? [/INST]"
        "Paris.<|im_end|>"
        "[INST] And of Italy? [/INST]"
        "Rome.<|im_end|>",
        ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    ),
    "vicuna": (
        "<|im_start|>"
        "Be brief. "
        "USER: What is the capital of France? ASSISTANT:"
        " Paris.<|im_end|>"
        "USER: And of Italy? ASSISTANT:"
        " Rome.<|im_end|>",
        [" Paris.<|im_end|>", " Rome.<|im_end|>"],
    ),
}

# Without a system message: the template's default system prompt (or none).
EXPECTED_NO_SYSTEM_PREFIX = {
    "alpaca": "<|im_start|>Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\n",
    "chatml": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "<|im_start|>[INST] What is the capital of France? [/INST]",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<|im_start|>[INST] What is the capital of France? [/INST]",
    "vicuna": "<|im_start|>A chat between a curious user and an artificial intelligence assistant. The assistant "
              "gives helpful, detailed, and polite answers to the user's questions. "
              "USER: What is the capital of France? ASSISTANT:",
}


def joined(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


def trained(segments: list[Segment]) -> list[tuple[str, int]]:
    return [(s.text, s.turn) for s in segments if s.train]


def test_every_shipped_template_is_covered():
    shipped = {p.stem for p in templates.resources.templates_dir().glob("*.yaml")}
    assert shipped == set(EXPECTED)


def test_tiny_tokenizer_special_tokens(tiny_tokenizer):
    assert (tiny_tokenizer.bos_token, tiny_tokenizer.eos_token, tiny_tokenizer.pad_token) == (BOS, EOS, EOS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_template_renders_exact_text(name, tiny_tokenizer):
    text, answers = EXPECTED[name]
    segments = render(RECORD, load_template(name), tiny_tokenizer)
    assert joined(segments) == text
    assert trained(segments) == [(answers[0], 0), (answers[1], 1)]
    assert all(s.turn == -1 for s in segments if not s.train)
    assert all(s.text for s in segments), "empty segments are dropped"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_template_without_system_uses_default(name, tiny_tokenizer):
    text, answers = EXPECTED[name]
    record = {"messages": MESSAGES[1:3]}
    segments = render(record, load_template(name), tiny_tokenizer)
    sep = {"alpaca": "\n\n", "chatml": "\n", "qwen": "\n"}.get(name, "")
    assert joined(segments) == EXPECTED_NO_SYSTEM_PREFIX[name] + answers[0] + sep
    assert trained(segments) == [(answers[0], 0)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_does_not_mutate_record(name, tiny_tokenizer):
    record = {"messages": [dict(m) for m in MESSAGES]}
    render(record, load_template(name), tiny_tokenizer)
    assert record == RECORD


@pytest.mark.parametrize("name", ["chatml", "llama2", "mistral", "vicuna", "alpaca"])
def test_braces_in_messages_are_kept_literally(name, tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": "fmt {content} {bos} {eos} {x}"},
                           {"role": "assistant", "content": "ans {content} {system} {eos}"}]}
    segments = render(record, load_template(name), tiny_tokenizer)
    assert "fmt {content} {bos} {eos} {x}" in joined(segments)
    assert trained(segments)[0][0].startswith(("ans {content} {system} {eos}", " ans {content} {system} {eos}"))


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_literal_system_placeholder_in_user_text_is_kept(name, tiny_tokenizer):
    record = {"messages": [{"role": "system", "content": S},
                           {"role": "user", "content": 'print(f"{system}")'},
                           {"role": "assistant", "content": "ok"}]}
    assert 'print(f"{system}")' in joined(render(record, load_template(name), tiny_tokenizer))


def test_system_message_not_first_is_refused(tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "a"}]}
    with pytest.raises(FtuneError, match="'system' message may only come first"):
        render(record, load_template("chatml"), tiny_tokenizer)


# ----------------------------------------------------------------------------- model (chat template)
def test_model_template_is_none():
    assert load_template("model") is None


def test_model_template_uses_tokenizer_chat_template(tiny_tokenizer):
    segments = render(RECORD, None, tiny_tokenizer)
    assert joined(segments) == tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert joined(segments) == EXPECTED["chatml"][0]  # the tiny tokenizer's template is ChatML
    assert trained(segments) == [("Paris.<|im_end|>\n", 0), ("Rome.<|im_end|>\n", 1)]
    assert all(s.turn == -1 for s in segments if not s.train)


def test_model_template_without_chat_template(tiny_tokenizer):
    class NoTemplate:
        chat_template = None
        eos_token = EOS

    with pytest.raises(FtuneError, match="no chat template"):
        render(RECORD, None, NoTemplate())


def test_model_template_must_grow_as_prefix(tiny_tokenizer):
    class Reversed:
        chat_template = "x"
        eos_token = EOS

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            # Renders newest message first: not a growing prefix.
            return "".join(m["content"] + "|" for m in reversed(messages)) + ("GEN" if add_generation_prompt else "")

    with pytest.raises(FtuneError, match="growing prefix"):
        render(RECORD, None, Reversed())


# ----------------------------------------------------------------------------- prompts and stops
def test_render_prompt_chatml(tiny_tokenizer):
    prompt = render_prompt(MESSAGES[:4], load_template("chatml"), tiny_tokenizer)
    assert prompt == EXPECTED["chatml"][0][: -len("Rome.<|im_end|>\n")]
    assert prompt.endswith("<|im_start|>assistant\n")
    assert render_prompt(MESSAGES[1:2], load_template("chatml"), tiny_tokenizer) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_render_prompt_model(tiny_tokenizer):
    prompt = render_prompt(MESSAGES[:4], None, tiny_tokenizer)
    assert prompt == tiny_tokenizer.apply_chat_template(MESSAGES[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name,stop", [("chatml", "<|im_end|>"), ("qwen", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                       ("alpaca", EOS), ("llama2", EOS), ("mistral", EOS), ("vicuna", EOS),
                                       ("model", EOS)])
def test_stop_text(name, stop, tiny_tokenizer):
    assert stop_text(load_template(name), tiny_tokenizer) == stop


def test_unknown_template_lists_valid_names():
    with pytest.raises(FtuneError) as info:
        load_template("chatlm")
    err = info.value
    assert "unknown template 'chatlm'" in err.title
    assert "Did you mean 'chatml'?" in err.title
    assert "dataset.template" in err.title
    assert err.problems == ["valid template names: alpaca, chatml, llama2, llama3, mistral, model, qwen, vicuna"]


def test_template_with_unknown_field(tmp_path, monkeypatch):
    (tmp_path / "odd.yaml").write_text("user: '{content}'\nassistant: '{content}'\ncolour: red\n")
    monkeypatch.setattr(templates.resources, "templates_dir", lambda: tmp_path)
    with pytest.raises(FtuneError, match="colour"):
        load_template("odd")


# ----------------------------------------------------------------------------- masks
def labelled(sample: dict) -> list[int]:
    return [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE]


def check_alignment(sample: dict) -> None:
    assert len(sample["input_ids"]) == len(sample["labels"])
    assert all(lab in (IGNORE, t) for t, lab in zip(sample["input_ids"], sample["labels"]))


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "model"])
def test_train_on_assistant_labels_exactly_the_answers(name, tiny_tokenizer):
    tok = tiny_tokenizer
    segments = render(RECORD, load_template(name), tok)
    (sample,), stats = tokenize_all([segments], tok, max_len=4096, train_on="assistant")
    check_alignment(sample)
    assert tok.decode(sample["input_ids"]) == joined(segments)
    answers = [text for text, _ in trained(segments)]
    assert tok.decode(labelled(sample)) == "".join(answers)
    # The labelled tokens are exactly the answers' tokens, in two contiguous runs.
    answer_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    assert labelled(sample) == answer_ids[0] + answer_ids[1]
    runs, prev = 0, IGNORE
    for lab in sample["labels"]:
        runs += lab != IGNORE and prev == IGNORE
        prev = lab
    assert runs == 2
    assert (stats.samples, stats.truncated, stats.dropped_no_target) == (1, 0, 0)
    assert stats.tokens == len(sample["input_ids"])
    assert stats.trained_tokens == len(answer_ids[0]) + len(answer_ids[1])


def test_train_on_last_labels_only_the_last_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = render(RECORD, load_template("chatml"), tok)
    (sample,), stats = tokenize_all([segments], tok, max_len=4096, train_on="last")
    check_alignment(sample)
    assert tok.decode(labelled(sample)) == "Rome.<|im_end|>"
    assert labelled(sample) == tok("Rome.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert stats.trained_tokens == len(labelled(sample))


def test_train_on_last_is_per_sample(tiny_tokenizer):
    tok = tiny_tokenizer
    one_turn = render({"messages": MESSAGES[:3]}, load_template("chatml"), tok)
    two_turns = render(RECORD, load_template("chatml"), tok)
    out, _ = tokenize_all([one_turn, two_turns], tok, max_len=4096, train_on="last")
    assert [tok.decode(labelled(s)) for s in out] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


def test_train_on_all_labels_every_token(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = render(RECORD, load_template("chatml"), tok)
    (sample,), stats = tokenize_all([segments], tok, max_len=4096, train_on="all")
    assert sample["labels"] == sample["input_ids"]
    assert tok.decode(sample["input_ids"]) == EXPECTED["chatml"][0]
    assert stats.trained_tokens == len(sample["input_ids"]) - 1  # position 0 is never predicted


def test_raw_text_is_fully_trained_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    record = {"text": "hello world, sort these numbers."}
    segments = render(record, load_template("chatml"), tok)
    assert segments == [Segment("hello world, sort these numbers.<|im_end|>", True, 0)]
    assert render(record, None, tok) == segments
    (sample,), stats = tokenize_all([segments], tok, max_len=4096, train_on="assistant")
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(sample["input_ids"]) == "hello world, sort these numbers.<|im_end|>"
    assert stats.trained_tokens == len(sample["input_ids"]) - 1


def test_truncation_is_counted_and_keeps_a_prefix(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = render(RECORD, load_template("chatml"), tok)
    (full,), _ = tokenize_all([segments], tok, max_len=4096, train_on="assistant")
    n = len(full["input_ids"])
    # Cut inside the last answer: the first answer is still trained.
    last_len = len(tok("Rome.<|im_end|>", add_special_tokens=False)["input_ids"]) + 1  # + the "\n" separator
    cut = n - last_len + 1
    (sample,), stats = tokenize_all([segments], tok, max_len=cut, train_on="assistant")
    assert len(sample["input_ids"]) == cut
    assert sample["input_ids"] == full["input_ids"][:cut]
    assert sample["labels"] == full["labels"][:cut]
    assert (stats.samples, stats.truncated, stats.dropped_no_target) == (1, 1, 0)
    assert stats.tokens == cut
    first = tok("Paris.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(first) < len(labelled(sample)) < len(labelled(full)), "the cut falls inside the last answer"
    assert labelled(sample)[: len(first)] == first
    # Exactly max_len is not truncated.
    _, stats = tokenize_all([segments], tok, max_len=n, train_on="assistant")
    assert (stats.truncated, stats.samples) == (0, 1)


def test_sample_whose_answer_is_cut_away_is_dropped(tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt = {"messages": [{"role": "user", "content": " ".join(["what is the capital of france"] * 20)},
                                {"role": "assistant", "content": "Paris."}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    template = load_template("chatml")
    segs = [render(long_prompt, template, tok), render(short, template, tok)]
    out, stats = tokenize_all(segs, tok, max_len=24, train_on="assistant")
    assert len(out) == 1 and tok.decode(labelled(out[0])) == "hello<|im_end|>"
    assert (stats.samples, stats.truncated, stats.dropped_no_target) == (1, 1, 1)
    assert stats.tokens == len(out[0]["input_ids"])


def test_only_first_token_trained_is_dropped(tiny_tokenizer):
    # Position 0 can never be a target, so a sample whose only label is at position 0 is dropped.
    segs = [[Segment("hello world", True, 0)]]
    out, stats = tokenize_all(segs, tiny_tokenizer, max_len=1, train_on="assistant")
    assert out == [] and (stats.samples, stats.truncated, stats.dropped_no_target) == (0, 1, 1)


def test_tokenize_all_empty(tiny_tokenizer):
    out, stats = tokenize_all([], tiny_tokenizer, max_len=16, train_on="assistant")
    assert out == [] and stats.samples == 0 and stats.tokens == 0


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama2", "llama3", "mistral", "qwen", "vicuna"])
def test_jinja_export_renders_exactly_like_the_template(name, tiny_tokenizer):
    """Merged models and vLLM get the training format as a Jinja chat template: same text, always."""
    template = templates.load_template(name)
    jinja = to_jinja(template, tiny_tokenizer)
    conversations = [
        [{"role": "user", "content": "hi {system} there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": 'b "q" é\n'},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]
    for messages in conversations:
        want = "".join(s.text for s in templates.render_named(template, messages, tiny_tokenizer))
        assert tiny_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False) == want
