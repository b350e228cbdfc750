"""Bad data rows: stop at the first one (dataset.on_bad_row=fail, the default) or skip them and
count (skip), reported after tokenising and again in summary.json at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass, field

from ftune.errors import FtuneError

SKIP_HINT = "Or set dataset.on_bad_row=skip to train on the good rows and count the bad ones."
SHOWN = 5  # examples kept for the report


@dataclass
class BadRows:
    """Collects skipped rows when `skip`; raises the row's FtuneError otherwise."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def found(self, title: str, problems: list[str] | None = None, hint: str = "") -> None:
        if not self.skip:
            raise FtuneError(title, problems, f"{hint} {SKIP_HINT}".strip())
        self.count += 1
        if len(self.examples) < SHOWN:
            self.examples.append(title)

    def summary(self) -> dict:
        return {"skipped": self.count, "examples": self.examples}


FAIL = BadRows(skip=False)
