"""`ftune eval`: held-out figures agree with the run's own, error analysis finds each problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftune.config.compose import compose
from ftune.eval.report import analyse, evaluate_run, repetition_rate
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
    assert report["loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)
    assert report["base_loss"] == pytest.approx(s["eval_loss_before"], rel=1e-4)
    assert len(report["generations"]) == 3 and "problem_counts" in report
    # The tiny random model never ends its answers within 8 tokens: the analysis must say so.
    assert report["problem_counts"].get("no_eos", 0) == 3
    saved = json.loads((tmp_path / "outputs" / "sft" / "eval" / "report.json").read_text())
    assert saved["loss"] == report["loss"]
    assert "| held-out loss |" in (tmp_path / "outputs" / "sft" / "eval" / "report.md").read_text()


@pytest.mark.parametrize("recipe", ["smollm2-rm", "smollm2-dpo"])
def test_eval_of_preference_stages_reports_their_accuracy(tiny_overrides, tmp_path, recipe):
    overrides = [o for o in tiny_overrides if not o.startswith("dataset.")]
    s = train(compose([f"recipe={recipe}", *overrides, "dataset.max_rows=16", "dataset.max_seq_len=128",
                       "dataset.eval_max_rows=8", "train.max_steps=2", "train.run_name=pref"]))
    report = evaluate_run(tmp_path / "outputs" / "pref", n_prompts=2, max_new=4)
    assert report["metrics"]["accuracy"] == pytest.approx(s["eval_metrics_after"]["accuracy"])
    assert report["loss"] == pytest.approx(s["eval_loss_after"], rel=1e-4)


def test_cli_eval(tiny_overrides, tmp_path):
    train(compose([*tiny_overrides, "train.max_steps=2", "train.run_name=sft"]))
    result = subprocess.run([sys.executable, "-m", "ftune.cli", "eval", f"run={tmp_path / 'outputs' / 'sft'}", "n=2",
                             "max_new_tokens=4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "held-out loss" in result.stdout
