"""Stopping on request: SIGTERM (preemption, `kill`, schedulers) or SIGINT (Ctrl-C) during training
finishes the current optimiser step, writes a checkpoint and ends the run with the command that
resumes it. A second signal stops at once (the last complete checkpoint is still there)."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ftune.train import distributed


class StopRequested(Exception):
    """Training stopped on a signal after writing the checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped on {signal_name} at step {step}")
        self.step, self.signal_name = step, signal_name


@contextmanager
def on_signals() -> Iterator[dict[str, Any]]:
    """Yields a dict whose "signal" becomes the signal's name once one arrives."""
    state: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if state["signal"] is not None:  # asked twice: stop now
            signal.signal(signum, previous[signum])
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        state["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def requested(state: dict[str, Any], accelerator: Any) -> bool:
    """True when any process got a signal (all processes must stop at the same step)."""


    mine = state["signal"] is not None
    if distributed.world() == 1:
        return mine
    flag = accelerator.reduce(torch.tensor([1.0 if mine else 0.0], device=accelerator.device), reduction="sum")
    if float(flag[0]) > 0 and state["signal"] is None:
        state["signal"] = "SIGTERM"
    return float(flag[0]) > 0
