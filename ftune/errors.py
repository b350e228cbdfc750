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
