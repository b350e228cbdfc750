"""The one error type users see: a message that names the key, file or row and the fix.

The CLI prints an FtuneError as a short panel and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class FtuneError(Exception):
    """A problem the user can fix. `problems` holds every problem found, one line each."""

    def __init__(self, title: str, problems: list[str] | None = None, hint: str | None = None):
        self.title = title
        self.problems = list(problems or [])
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.title]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def out_of_memory(exc: BaseException) -> FtuneError:
    """torch's OutOfMemoryError (a GPU's memory exhausted mid-run) as the changes that need less.

    Checkpoints already written stay whole (each is written to a temporary folder and renamed)."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return FtuneError(
        "the device ran out of memory", [first,
                                         "less memory per step: train.gradient_checkpointing=auto (or a number of "
                                         "decoder layers to recompute, or true for all of them)",
                                         "train.micro_batch_size halved with train.grad_accum doubled (same batch), "
                                         "or a shorter dataset.max_seq_len",
                                         "a 4-bit base (method=qlora) or 8-bit AdamW (train.optim=adamw_8bit)"],
        "`ftune plan <the same overrides>` shows the estimate; when it said the run fits, state the usable "
        "memory lower with hardware.memory_gib=<GiB> and auto recomputes more layers. A run with checkpoints "
        "continues from its last one with train.resume=true train.run_name=<its name>.")
