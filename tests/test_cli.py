"""The command line end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args, env=None, timeout=300):
    full_env = {**os.environ, "COLUMNS": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ftune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_data_preview_shows_trained_and_masked_counts(tiny_overrides):
    out = run_cli("data", "preview", *tiny_overrides, "-n", "2")
    assert out.returncode == 0, out.stderr
    assert "sample 1:" in out.stdout and "sample 2:" in out.stdout and "trained" in out.stdout
    assert "<|im_start|>assistant" in out.stdout


def test_train_command_runs_and_reports(tiny_overrides, tmp_path):
    out = run_cli("train", *tiny_overrides, "train.max_steps=2", "train.run_name=cli")
    assert out.returncode == 0, out.stderr
    assert "held-out loss:" in out.stdout and "tokens/s" in out.stdout
    assert (tmp_path / "outputs" / "cli" / "summary.json").is_file()


def test_bad_data_row_is_one_clear_error(tiny_overrides, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": "no answer"}\n')
    out = run_cli("train", *tiny_overrides, f"dataset.sources.0.path={bad}", "dataset.eval_fraction=0")
    assert out.returncode == 2
    assert "row 2" in out.stderr and "output" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("adapter"))


def test_python_dash_m_ftune_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "ftune", "recipes"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert "smollm2-lora-sft" in out.stdout


def test_out_of_memory_is_a_panel_with_the_changes_that_need_less(monkeypatch, capsys):
    import torch

    from ftune import cli

    def too_big() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "app", too_big)
    monkeypatch.setattr("ftune.safety.install", lambda: None)  # no process-wide stream wrapping in the test run
    monkeypatch.setattr("ftune.logs.quiet_libraries", lambda: None)
    monkeypatch.setattr(sys, "argv", ["ftune", "train"])
    with pytest.raises(SystemExit) as end:
        cli.main()
    err = capsys.readouterr().err
    assert end.value.code == 2 and "Traceback" not in err
    assert "ran out of memory" in err and "Tried to allocate 2.00 GiB" in err
    assert "train.gradient_checkpointing=auto" in err and "ftune plan" in err
