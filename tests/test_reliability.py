"""Reliability: a signal stops training cleanly with a checkpoint and the command that resumes it;
resuming after SIGKILLs (some inside checkpoint writes) is bit-identical to never stopping; a
damaged checkpoint is skipped for the previous one; non-finite steps stop or are skipped."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.train.run import train

REPO = Path(__file__).resolve().parent.parent


def _same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return set(ta) == set(tb) and all(bool((ta[k] == tb[k]).all()) for k in ta)


def _cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune.cli", *args], capture_output=True, text=True, cwd=cwd, **kw)


def test_sigterm_checkpoints_and_the_printed_command_resumes_exactly(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "train.max_steps=60", "train.micro_batch_size=2", "hardware.threads=1",
              "train.sample_max_new_tokens=0"]
    ref = _cli(["train", *common, "train.run_name=ref"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "ftune.cli", "train", *common, "train.run_name=sig"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    metrics = tmp_path / "outputs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "resume with:" in out
    stopped = max(json.loads(line).get("step", 0) for line in metrics.read_text().splitlines())
    assert 3 <= stopped < 60 and (tmp_path / "outputs" / "sig" / "checkpoints" / f"step-{stopped:07d}").is_dir()
    command = out.split("resume with:")[1].splitlines()[0].strip()
    args = shlex.split(command)
    assert args[:2] == ["ftune", "train"] and "train.resume=true" in args
    resumed = _cli(args[1:], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(tmp_path / "outputs" / "ref" / "adapter" / "adapter_model.safetensors",
                         tmp_path / "outputs" / "sig" / "adapter" / "adapter_model.safetensors")


def test_kill_resume_harness_is_bit_identical(tmp_path):
    """tests/kill_resume.py: 5 SIGKILLs at random moments, most inside checkpoint writes."""
    from kill_resume import harness

    result = harness(kills=5, seed=0, out=tmp_path)
    assert result["bit_identical"] and len(result["log"]) == 5
    assert result["during_checkpoint_write"] >= 1


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tiny_overrides, tmp_path, capsys):
    common = [*tiny_overrides, "train.max_steps=4", "train.save_every=1", "train.run_name=d"]
    train(compose(common), stop_after=3)
    ckpts = tmp_path / "outputs" / "d" / "checkpoints"
    newest = ckpts / "step-0000003" / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: the file still parses, its checksum does not match
    newest.write_bytes(bytes(data))
    s = train(compose([*common, "train.resume=true"]))
    assert s["steps"] == 4
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "checkpoint step-0000003 skipped: trainable.safetensors does not match its checksum" in printed
    newest.write_bytes(bytes(data))  # the resumed run wrote step 3 again; damage it once more
    with pytest.raises(FtuneError, match="damaged"):
        train(compose([*common, f"train.resume={ckpts / 'step-0000003'}"]))


def test_nonfinite_steps_stop_or_are_skipped(tiny_overrides, tmp_path):
    # An absurd learning rate blows the weights up after the first update.
    common = [*tiny_overrides, "train.max_steps=4", "train.lr=1e30", "train.warmup_steps=0"]
    with pytest.raises(FtuneError, match="not finite") as err:
        train(compose([*common, "train.run_name=stop"]))
    assert err.value.problems[0].startswith("rows of this step:") and "on_nonfinite=skip" in err.value.hint
    s = train(compose([*common, "train.run_name=skip", "train.on_nonfinite=skip"]))
    assert s["steps"] == 4 and s["skipped_steps"] and min(s["skipped_steps"]) >= 2
