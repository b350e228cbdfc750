"""Safety: no pickle unless opted in, secrets never written or printed, sandboxed chat
templates, trust_remote_code announced, run directories never overwritten by accident, and bad
data rows skipped and counted when asked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ftune.config.compose import compose
from ftune.errors import FtuneError

SECRET = "hf_SeCrEtVaLuE0123456789"


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_state_io_round_trips_training_state_exactly(tmp_path):
    from ftune.train import state_io

    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2).bfloat16()}},
                           "param_groups": [{"lr": 1e-4 / 3, "betas": (0.9, 0.999), "params": [0]}]},
             "rng": {"python": (3, tuple(range(5)), None), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
             "scheduler": {"last_epoch": 7, "lr_lambdas": [None], "_x": float("inf")}}
    state_io.save(state, tmp_path, "s")
    back = state_io.load(tmp_path, "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    assert back["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    group = back["optimizer"]["param_groups"][0]
    assert group["lr"] == 1e-4 / 3 and group["betas"] == (0.9, 0.999)
    assert back["rng"]["python"] == state["rng"]["python"]
    np.random.set_state(back["rng"]["numpy"])  # accepted by numpy as is
    assert back["rng"]["numpy"][1].dtype == np.uint32
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["scheduler"] == state["scheduler"]


def test_checkpoints_hold_no_pickle_and_a_legacy_pickle_state_needs_opt_in(tiny_overrides, tmp_path):
    from ftune.train.run import train

    train(compose([*tiny_overrides, "train.max_steps=2", "train.save_every=1", "train.run_name=r",
                   "train.sample_max_new_tokens=0"]))
    ckpt = tmp_path / "outputs" / "r" / "checkpoints" / "step-0000001"
    assert sorted(p.suffix for p in ckpt.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]
    # A checkpoint of an older version kept its optimiser state as pickle: refused by default.
    from ftune.train import checkpoint, state_io

    state = state_io.load(ckpt, checkpoint.TRAIN_STATE)
    for suffix in (".json", ".safetensors"):
        (ckpt / f"{checkpoint.TRAIN_STATE}{suffix}").unlink()
    torch.save(state, ckpt / "train_state.pt")
    with pytest.raises(FtuneError) as exc:
        checkpoint._train_state(ckpt, allow_pickle=False)
    assert "pickle" in exc.value.render() and "model.allow_pickle=true" in exc.value.render()
    assert checkpoint._train_state(ckpt, allow_pickle=True)["scheduler"] == state["scheduler"]


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tiny_overrides, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from ftune.models import load as model_load

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    args = [*tiny_overrides, f"model.path={folder}"]
    with pytest.raises(FtuneError) as exc:
        model_load.load(compose(args).cfg, torch.device("cpu"))
    assert "pytorch_model.bin" in exc.value.title and "model.allow_pickle=true" in exc.value.render()
    model, _ = model_load.load(compose([*args, "model.allow_pickle=true"]).cfg, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_secrets_never_reach_the_console_the_run_directory_or_errors(tiny_overrides, tmp_path):
    env = {"HF_TOKEN": SECRET, "WANDB_API_KEY": "wandb-0123456789abcdef"}
    # A secret pulled into the config by interpolation is used, but never shown or saved.
    ok = _cli(["train", *tiny_overrides, "train.max_steps=1", "train.run_name=s", "dataset.sample_prompt=${oc.env:HF_TOKEN}",
               "train.sample_max_new_tokens=2"], tmp_path, env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = ok.stdout + ok.stderr
    assert SECRET not in out and "<redacted HF_TOKEN>" in re.sub(r"\s+", " ", out)
    files = [p for p in (tmp_path / "outputs" / "s").rglob("*")
             if p.is_file() and p.suffix in (".json", ".yaml", ".txt", ".jsonl")]
    assert any(p.name == "config.yaml" for p in files)
    for path in files:
        assert SECRET not in path.read_text(errors="replace"), path
    assert "<redacted HF_TOKEN>" in (tmp_path / "outputs" / "s" / "config.yaml").read_text()
    # ... nor in an error message that names the value.
    bad = _cli(["train", *tiny_overrides[1:], f"model.path={tmp_path / SECRET}"], tmp_path, env)
    assert bad.returncode == 2 and SECRET not in bad.stdout + bad.stderr
    assert "<redacted HF_TOKEN>" in re.sub(r"[\s│]+", " ", bad.stderr)


def test_debug_shows_the_traceback_and_unexpected_errors_are_short(tmp_path):
    plain = _cli(["train", "train.lrr=1"], tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = _cli(["train", "train.lrr=1", "--debug"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FtuneError" in debug.stderr


def test_chat_templates_render_in_a_sandbox(tiny_tokenizer):
    import copy

    from ftune.data import templates

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}"
    with pytest.raises(FtuneError) as exc:
        templates.render_model([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok)
    assert "sandbox" in exc.value.title


def test_trust_remote_code_is_announced(tiny_model_dir, capsys):
    from ftune.config.schema import ModelConfig
    from ftune.models.load import load_tokenizer

    load_tokenizer(str(tiny_model_dir), ModelConfig(name="t", path=str(tiny_model_dir), trust_remote_code=True))
    assert "trust_remote_code=true" in capsys.readouterr().err
    load_tokenizer(str(tiny_model_dir), ModelConfig(name="t", path=str(tiny_model_dir)))
    assert "trust_remote_code" not in capsys.readouterr().err


def test_a_run_directory_is_never_overwritten_by_accident(tiny_overrides, tmp_path):
    from ftune.train.run import fresh_run_dir, train

    args = [*tiny_overrides, "train.max_steps=1", "train.run_name=keep", "train.sample_max_new_tokens=0"]
    train(compose(args))
    summary = tmp_path / "outputs" / "keep" / "summary.json"
    first = summary.read_text()
    with pytest.raises(FtuneError) as exc:
        train(compose(args))
    assert "already holds a run" in exc.value.title and "--overwrite" in exc.value.hint
    assert summary.read_text() == first
    (tmp_path / "outputs" / "keep" / "marker").write_text("old")
    train(compose([*args, "train.overwrite=true", "train.seed=7"]))
    assert not (tmp_path / "outputs" / "keep" / "marker").exists() and summary.read_text() != first
    # Automatic names never collide: the second run of the same second gets a suffix.
    cfg = compose(tiny_overrides).cfg
    first_dir = fresh_run_dir(cfg)
    first_dir.mkdir(parents=True)
    assert fresh_run_dir(cfg) != first_dir or first_dir.name != fresh_run_dir(cfg).name


def test_bad_rows_can_be_skipped_and_counted(tiny_overrides, tmp_path):
    from rich.console import Console

    from ftune.train.run import train

    good = [json.dumps({"instruction": f"what is {i} + {i}", "output": f"{2 * i}"}) for i in range(20)]
    rows = [*good[:5], "{not json", json.dumps({"instruction": "no answer"}), json.dumps([1, 2]), *good[5:]]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(("\n".join(rows) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    args = [*tiny_overrides, f"dataset.sources=[{{path: {data}, format: alpaca}}]", "train.max_steps=1",
            "train.run_name=skip", "train.sample_max_new_tokens=0"]
    with pytest.raises(FtuneError) as exc:
        train(compose(args))
    assert "line 6" in exc.value.title and "dataset.on_bad_row=skip" in exc.value.hint
    console = Console(record=True, width=200)
    summary = train(compose([*args, "dataset.on_bad_row=skip"]), console)
    assert summary["bad_rows_skipped"] == 4
    text = console.export_text()
    assert "4 bad rows skipped" in text and "line 6: not valid JSON" in text and "row 6: column 'output'" in text
    stats = json.loads((tmp_path / "outputs" / "skip" / "data_stats.json").read_text())
    assert stats["bad_rows"]["skipped"] == 4 and stats["train"]["samples"] + stats["eval"]["samples"] == 20
