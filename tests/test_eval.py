"""`ftune eval`: held-out figures agree with the run's own (trained and base, every kind of
method and stage), error analysis finds each problem, benchmarks through lm-eval agree with an
independent scorer, and --compare ranks models by a reward model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.eval.report import EvalOptions, analyse, evaluate, evaluate_run, repetition_rate
from ftune.train.run import train


def test_repetition_rate():
    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition_rate([1, 2, 3, 4] * 6) > 0.7


def test_analyse_names_each_problem(tiny_tokenizer):
    tok = tiny_tokenizer
    assert analyse("", "", 0, True, 64, None, tok, []) == ["empty"]
    assert analyse("paris", "paris", 64, False, 64, "paris", tok, [5, 6]) == ["no_eos", "over_long"]
    assert "template_leak" in analyse("x <|im_start|>user", "x <|im_start|>user", 4, True, 64, None, tok, [1, 2])
    assert analyse("the answer", "the answer", 3, True, 64, "the answer", tok, [1, 2, 3]) == []


def test_eval_of_an_sft_run_matches_the_run_summary(tiny_overrides, tmp_path):
    s = train(compose([*tiny_overrides, "train.max_steps=3", "train.lr=1e-2", "train.run_name=sft",
                       "dataset.packing=false"]))
    report = evaluate_run(tmp_path / "outputs" / "sft", n_prompts=3, max_new=8)
    trained, base = report["trained"], report["base"]
    assert trained["loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)
    assert base["loss"] == pytest.approx(s["eval_loss_before"], rel=1e-4)
    assert len(trained["generations"]) == 3 and "problem_counts" in trained and "problem_counts" in base
    # The tiny random model never ends its answers within 8 tokens: the analysis must say so.
    assert trained["problem_counts"].get("no_eos", 0) == 3
    out = tmp_path / "outputs" / "sft" / "eval"
    saved = json.loads((out / "report.json").read_text())
    assert saved["trained"]["loss"] == trained["loss"]
    assert "| held-out loss |" in (out / "report.md").read_text()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["full", "qalora"])
def test_eval_base_of_methods_without_an_adapter_switch(tiny_overrides, tmp_path, method):
    """Full fine-tunes and ftune's own adapters have no disable_adapter: the base is loaded on its own."""
    extra = ["method.group_size=32"] if method == "qalora" else []
    s = train(compose([*tiny_overrides, f"method={method}", *extra, "train.max_steps=2", "train.lr=1e-2",
                       "train.run_name=m", "dataset.packing=false"]))
    report = evaluate_run(tmp_path / "outputs" / "m", n_prompts=1, max_new=2)
    assert report["trained"]["loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)
    if method == "full":  # QA-LoRA's base is the INT4 group-quantised model; ftune eval's is the float one
        assert report["base"]["loss"] == pytest.approx(s["eval_loss_before"], rel=1e-4)
    assert report["base"]["loss"] != pytest.approx(report["trained"]["loss"], rel=1e-3)


def test_eval_of_a_ppo_run_scores_answers_with_its_reward(tiny_overrides, tmp_path):
    s = train(compose(["recipe=smollm2-ppo", *tiny_overrides, "stage.reward=length", "stage.reward_target_length=3",
                       "stage.max_new_tokens=6", "train.max_steps=2", "train.run_name=ppo", "dataset.eval_max_rows=4"]))
    report = evaluate_run(tmp_path / "outputs" / "ppo", n_prompts=4, max_new=6)
    # The run's own held-out evaluation is the mean reward of the same greedy answers.
    assert report["trained"]["reward"] == pytest.approx(s["eval_metrics_after"]["reward"], abs=1e-6)
    assert report["base"]["reward"] == pytest.approx(s["eval_metrics_before"]["reward"], abs=1e-6)
    assert all("reward" in g for g in report["trained"]["generations"])


def test_eval_of_a_model_path_on_a_composed_dataset(tiny_overrides, tiny_model_dir, tmp_path):
    s = train(compose([*tiny_overrides, "train.max_steps=1", "train.run_name=r", "dataset.packing=false"]))
    overrides = [o for o in tiny_overrides if not o.startswith("model.path")] + ["dataset.packing=false"]
    report = evaluate(model=str(tiny_model_dir), overrides=overrides,
                      opts=EvalOptions(n_prompts=1, max_new=2, out=str(tmp_path / "ev")))
    assert report["trained"]["loss"] == pytest.approx(s["eval_loss_before"], rel=1e-4)  # the same model and rows
    assert "base" not in report and (tmp_path / "ev" / "report.md").is_file()
    with pytest.raises(FtuneError, match="exactly one of"):
        evaluate(run=str(tmp_path / "outputs" / "r"), model=str(tiny_model_dir))


@pytest.mark.parametrize("recipe", ["smollm2-rm", "smollm2-dpo"])
def test_eval_of_preference_stages_reports_their_accuracy(tiny_overrides, tmp_path, recipe):
    overrides = [o for o in tiny_overrides if not o.startswith("dataset.")]
    s = train(compose([f"recipe={recipe}", *overrides, "dataset.max_rows=16", "dataset.max_seq_len=128",
                       "dataset.eval_max_rows=8", "train.max_steps=2", "train.run_name=pref"]))
    report = evaluate_run(tmp_path / "outputs" / "pref", n_prompts=2, max_new=4)
    assert report["trained"]["metrics"]["accuracy"] == pytest.approx(s["eval_metrics_after"]["accuracy"])
    assert report["trained"]["loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)


def test_cli_eval(tiny_overrides, tmp_path):
    train(compose([*tiny_overrides, "train.max_steps=2", "train.run_name=sft"]))
    result = subprocess.run([sys.executable, "-m", "ftune.cli", "eval", f"run={tmp_path / 'outputs' / 'sft'}", "n=2",
                             "max_new_tokens=4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "held-out loss" in result.stdout


def test_outcomes_and_bradley_terry_ratings():
    from ftune.eval.compare import bradley_terry, outcomes

    wins = outcomes([[1.0, 2.0, 3.0, 0.0], [0.0, 1.0, 3.0, 1.0]], tie=0.0)
    assert wins == [[0, 2.5], [1.5, 0]]  # two wins, one tie, one loss
    a, b = bradley_terry([[0, 3.0], [1.0, 0]])  # 3:1, plus half a tie each way: 3.5 / 1.5 odds
    assert a - b == pytest.approx(400 * math.log10(3.5 / 1.5), abs=0.01)
    assert (a + b) / 2 == pytest.approx(1000)
    # Three players in a cycle of equal strength rate equal; a clean sweep stays finite.
    assert len(set(round(r, 6) for r in bradley_terry([[0, 2, 1], [1, 0, 2], [2, 1, 0]]))) == 1
    assert all(math.isfinite(r) for r in bradley_terry([[0, 10], [0, 0]]))


def test_compare_runs_judged_by_a_reward_model(tiny_overrides, tiny_model_dir, tmp_path):
    from ftune.eval.compare import compare

    for name, lr in (("a", "1e-2"), ("b", "1e-4")):
        train(compose([*tiny_overrides, "train.max_steps=2", f"train.lr={lr}", f"train.run_name={name}"]))
    train(compose(["recipe=smollm2-rm", *tiny_overrides, "train.max_steps=2", "train.run_name=rm"]))
    runs = tmp_path / "outputs"
    with pytest.raises(FtuneError, match="not a reward model"):
        compare([str(runs / "a"), str(runs / "b")], judge=str(runs / "a"))
    report = compare([str(runs / "a"), str(runs / "b"), str(tiny_model_dir)], judge=str(runs / "rm"), n_prompts=4,
                     max_new=4, out=str(tmp_path / "cmp"))
    k = 3
    assert report["prompts"] == 4 and len(report["elo"]) == k
    for i in range(k):  # win rates of a pair add up to one (ties count half each way)
        for j in range(k):
            if i != j:
                assert report["win_rate"][i][j] + report["win_rate"][j][i] == pytest.approx(1.0)
    # The ratings follow the judge: the highest mean reward never rates below the lowest.
    best, worst = max(range(k), key=report["mean_reward"].__getitem__), min(range(k), key=report["mean_reward"].__getitem__)
    assert report["elo"][best] >= report["elo"][worst]
    assert "| rank | model |" in (tmp_path / "cmp" / "compare.md").read_text()
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["contestants"] == ["a", "b", tiny_model_dir.name]
