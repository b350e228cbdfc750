"""Checkpoints: written to a temporary folder and renamed, so a folder named step-N is complete.

A checkpoint holds the trainable parameters only (an adapter is megabytes, not the base model),
the optimiser and scheduler states, every RNG state and the step. The data order is a function of
(seed, step), so the step alone restores the position in the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ftune import safety
from ftune.errors import FtuneError
from ftune.train import distributed, state_io

PREFIX = "step-"
STATE = "state.json"
CHECKSUMS = "sha256"
TRAIN_STATE = "train_state"  # optimiser, scheduler and RNG states (state_io: safetensors + JSON)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pause_for_tests() -> None:
    """FTUNE_CHECKPOINT_DELAY=<seconds>: pause halfway through each checkpoint write, so the
    kill/resume harness (tests/kill_resume.py) can kill inside writes."""
    delay = float(os.environ.get("FTUNE_CHECKPOINT_DELAY", "0") or 0)
    if delay > 0:

        time.sleep(delay)


def verify(ckpt: Path) -> str | None:
    """None when the checkpoint's files match the checksums in its state.json, else what is wrong."""
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable {STATE} ({type(exc).__name__})"
    for name, expected in state.get(CHECKSUMS, {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != expected:
            return f"{name} does not match its checksum"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, extra: dict, keep: int) -> Path | None:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` complete ones.

    Every process calls this (sharded tensors are gathered collectively); rank 0 writes."""
    tensors, optim = distributed.full_state(model), distributed.optimizer_state(model, optimizer)
    if not distributed.is_main():
        return None
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    need = sum(t.numel() * t.element_size() for t in tensors.values()) * 4  # tensors + AdamW moments, with slack
    free = shutil.disk_usage(ckpt_root).free
    if free < need:
        raise FtuneError(f"checkpoint of step {step}: {free / 2**20:.0f} MiB free on {ckpt_root}, about "
                         f"{need / 2**20:.0f} MiB needed", hint="Free disk space, or point train.output_dir elsewhere, "
                         "then resume with train.resume=true (earlier checkpoints are intact).")
    save_file(tensors, str(tmp / "trainable.safetensors"))
    _pause_for_tests()
    state_io.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp, TRAIN_STATE)
    sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
    # state.json is written last: its presence marks the folder complete; its checksums catch a
    # file damaged after the write.
    (tmp / STATE).write_text(json.dumps({"step": step, **extra, CHECKSUMS: sums}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders from a crash are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob(f"{PREFIX}*") if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


SKIPPED: list[str] = []  # warnings of the last find(), printed by the trainer


def find(path: Path) -> Path:
    """A checkpoint folder from a checkpoint path or a run directory (its newest checkpoint)."""
    if (path / STATE).is_file():
        problem = verify(path)
        if problem:
            raise FtuneError(f"train.resume: checkpoint {path} is damaged: {problem}",
                             hint="Resume from the run directory instead: the newest intact checkpoint is used.")
        return path
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise FtuneError(f"train.resume: no complete checkpoint under {path}",
                         hint="Checkpoints are written every train.save_every steps; start without resume.")
    for ckpt in reversed(found):  # newest intact one; a damaged one is skipped with a warning
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        SKIPPED.append(f"checkpoint {ckpt.name} skipped: {problem}")
    raise FtuneError(f"train.resume: every checkpoint under {path} is damaged", SKIPPED[-len(found):],
                     "Start the run again without train.resume.")


def _train_state(ckpt: Path, allow_pickle: bool) -> dict:
    if state_io.exists(ckpt, TRAIN_STATE):
        return state_io.load(ckpt, TRAIN_STATE)
    legacy = ckpt / "train_state.pt"  # checkpoints of earlier ftune versions kept this state as pickle
    if legacy.is_file() and allow_pickle:
        return torch.load(legacy, weights_only=False)
    raise FtuneError(f"train.resume: {ckpt} has no {TRAIN_STATE}.safetensors/.json"
                     + (f" (only the pickle file {legacy.name})" if legacy.is_file() else ""),
                     hint=safety.ALLOW_PICKLE_HINT if legacy.is_file() else "Resume from a complete checkpoint.")


def load(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, allow_pickle: bool = False) -> dict:
    """Restore parameters, optimiser, scheduler and RNG; returns the saved state.json."""
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise FtuneError(f"train.resume: checkpoint {ckpt} does not match this model/method",
                         [f"unknown parameter {unknown[0]} (+{len(unknown) - 1} more)"],
                         "Resume with the same recipe and overrides that wrote the checkpoint.")
    state = _train_state(ckpt, allow_pickle)
    distributed.load_full_state(model, optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((ckpt / STATE).read_text())
