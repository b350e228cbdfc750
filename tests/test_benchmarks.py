"""Benchmarks in `ftune eval` (lm-eval-harness): local task configs are checked before anything
loads, and lm-eval's scores on the tiny model equal an independent computation: log-likelihood
argmax for multiple choice, greedy decoding + exact match for generation."""

from __future__ import annotations

import json

import pytest
import torch

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.eval import benchmarks
from ftune.eval.report import EvalOptions, evaluate
from ftune.train.run import train

pytest.importorskip("lm_eval")

MC = [("the capital of france is", ["paris", "berlin", "world"], 0),
      ("what is 3 + 9", ["12", "39", "the"], 0),
      ("sort these numbers", ["hello world", "answer", "plural"], 2),
      ("reverse word", ["drow", "word", "letters"], 1),
      ("count letters in hello", ["five", "three", "kilometres"], 0),
      ("convert kilometres", ["metres", "paris", "task"], 0)]


def write_task(folder, kind: str, rows: list[dict], **extra) -> str:
    (folder / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"name: t{kind}", f"type: {kind}", f"file: {kind}.jsonl", "prompt: 'Q: {question}\\nA:'",
             *(f"{k}: {json.dumps(v)}" for k, v in extra.items())]
    path = folder / f"{kind}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def choice_scores(model, tokenizer, query: str, choices: list[str]) -> tuple[list[float], list[float]]:
    """(sum log-prob of each " choice" after the query, the same per byte): lm-eval's acc / acc_norm."""
    ctx = tokenizer(query, add_special_tokens=False)["input_ids"]
    sums, per_byte = [], []
    for choice in choices:
        whole = tokenizer(query + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        cont = range(len(ctx), len(whole))
        total = float(sum(logp[i - 1, whole[i]] for i in cont))
        sums.append(total)
        per_byte.append(total / len((" " + choice).encode()))
    return sums, per_byte


def greedy_line(model, tokenizer, query: str, n: int) -> str:
    ids = tokenizer(query, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).split("\n")[0]


def test_task_configs_are_checked_before_anything_loads(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nfile: rows.jsonl\ncolour: blue\n")
    with pytest.raises(FtuneError, match="not a valid task config"):
        benchmarks.load_task_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "t.yaml").write_text("name: x\ntype: ranking\nfile: rows.jsonl\nprompt: 'no question here'\n")
    with pytest.raises(FtuneError) as err:
        benchmarks.load_task_config(str(tmp_path / "t.yaml"))
    assert any("type must be" in p for p in err.value.problems) and any("{question}" in p for p in err.value.problems)
    rows = [{"question": "a", "choices": ["x", "y"], "answer": 0}, {"question": "b", "choices": ["x"], "answer": 0},
            {"question": "c", "choices": ["x", "y"], "answer": "z"}, {"q": "d"}]
    task = benchmarks.load_task_config(write_task(tmp_path, "multiple_choice", rows))
    with pytest.raises(FtuneError) as err:
        benchmarks.read_rows(task)
    assert [p.split(":")[0] for p in err.value.problems] == ["row 2", "row 3", "row 4"]
    with pytest.raises(FtuneError, match="neither a YAML file nor a shipped task config"):
        benchmarks.load_task_config("no-such-task")


def test_shipped_task_configs_load():
    for name in ("smol-mc", "smol-qa"):
        task = benchmarks.load_task_config(name)
        rows = benchmarks.read_rows(task)
        assert len(rows) > 50 and all("query" in r for r in rows)


def test_unknown_and_unreachable_benchmarks_fail_before_the_model_loads():
    with pytest.raises(FtuneError, match="unknown task") as err:
        benchmarks.prepare(["hellaswg"], [])
    assert "hellaswag" in err.value.problems[0]
    # Tests run offline (HF_DATASETS_OFFLINE=1): a named benchmark's data is not reachable.
    with pytest.raises(FtuneError, match="could not be loaded") as err:
        benchmarks.prepare(["arc_easy"], [])
    assert "tasks=" in err.value.hint


def test_lm_eval_scores_equal_an_independent_computation(tiny_overrides, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in MC]
    mc = write_task(tmp_path, "multiple_choice", rows)
    acc = acc_norm = 0
    for q, choices, answer in MC:
        sums, per_byte = choice_scores(model, tok, f"Q: {q}\nA:", choices)
        acc += max(range(len(choices)), key=sums.__getitem__) == answer
        acc_norm += max(range(len(choices)), key=per_byte.__getitem__) == answer
    # Generation: half the rows' answers are what the model really says, so exact match must be 0.5.
    questions = [q for q, _, _ in MC]
    said = [greedy_line(model, tok, f"Q: {q}\nA:", 5).strip() for q in questions]
    gen_rows = [{"question": q, "answer": said[i] if i % 2 == 0 else said[i] + " nonsense"}
                for i, q in enumerate(questions)]
    gen = write_task(tmp_path, "generate", gen_rows, max_new_tokens=5)
    overrides = [o for o in tiny_overrides if not o.startswith("model.path")]
    report = evaluate(model=str(tiny_model_dir), overrides=overrides,
                      opts=EvalOptions(n_prompts=0, tasks=(mc, gen), out=str(tmp_path / "ev")))
    scores = report["trained"]["benchmarks"]
    assert scores["local_tmultiple_choice"]["acc"] == pytest.approx(acc / len(MC))
    assert scores["local_tmultiple_choice"]["acc_norm"] == pytest.approx(acc_norm / len(MC))
    assert scores["local_tgenerate"]["exact_match"] == pytest.approx(0.5)
    assert "local_tgenerate exact_match" in (tmp_path / "ev" / "report.md").read_text()


def test_benchmarks_of_a_run_against_its_base(tiny_overrides, tmp_path):
    train(compose([*tiny_overrides, "train.max_steps=2", "train.lr=1e-2", "train.run_name=r"]))
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in MC]
    mc = write_task(tmp_path, "multiple_choice", rows)
    report = evaluate(run=str(tmp_path / "outputs" / "r"), opts=EvalOptions(n_prompts=1, max_new=2, tasks=(mc,)))
    trained = report["trained"]["benchmarks"]["local_tmultiple_choice"]
    base = report["base"]["benchmarks"]["local_tmultiple_choice"]
    assert set(trained) == set(base) == {"acc", "acc_norm"}
    assert report["benchmark_names"] == ["local_tmultiple_choice"]
