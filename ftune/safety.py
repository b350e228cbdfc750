"""Safety rules that hold everywhere: no pickle-based files unless the user opts in, and no
secret from the environment in anything ftune prints or writes.

Pickle can run arbitrary code when loaded, so a weight file from the internet in that format is
a program, not data. Tokens (HF_TOKEN, WANDB_API_KEY, ...) reach configs through `${oc.env:...}`
and file paths; they are replaced by `<redacted NAME>` in the console, in error panels and in
the config saved to the run directory.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from ftune.errors import FtuneError

# Environment variable names that hold credentials.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH", re.I)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact ordinary text
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOW_PICKLE_HINT = ("Convert the file to safetensors (safetensors.torch.save_file), or, only if you trust "
                     "its author, set model.allow_pickle=true.")


def secrets() -> dict[str, str]:
    """{value: variable name} of the credentials in the environment, longest value first."""
    found = {v: k for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def redact(text: str) -> str:
    for value, name in secrets().items():
        if value in text:
            text = text.replace(value, f"<redacted {name}>")
    return text


class RedactingStream:
    """A text stream that redacts secrets from everything written to it (wraps stdout/stderr)."""

    def __init__(self, inner: TextIO):
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._inner, name)


def install() -> None:
    """Redact secrets from everything the process prints: plain writes via the wrapped streams,
    and rich's text before it is wrapped into lines (a secret split over two lines would slip
    past a stream filter)."""


    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    if not getattr(Console.render_str, "_ftune_redacts", False):
        original = Console.render_str

        def render_str(self: Any, text: str, *args: Any, **kwargs: Any) -> Any:
            return original(self, redact(text), *args, **kwargs)

        render_str._ftune_redacts = True  # type: ignore[attr-defined]
        Console.render_str = render_str  # type: ignore[method-assign]


def pickle_files(folder: Path) -> list[Path]:
    """Pickle-based weight files in a folder that has no safetensors alternative."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")


def refuse_pickle(folder: Path, what: str, allow: bool) -> None:
    """Raise when `folder` holds weights only as pickle files and the user has not opted in."""
    found = pickle_files(folder)
    if found and not allow:
        raise FtuneError(f"{what}: {found[0]} is a pickle file; ftune reads weights as safetensors only",
                         [f"pickle files can run code when loaded ({', '.join(p.name for p in found[:3])})"],
                         ALLOW_PICKLE_HINT)


def note_remote_code(console: Any, path: str) -> None:
    """trust_remote_code runs Python shipped with the model: say so every time it is on."""
    console.print(f"[yellow]model.trust_remote_code=true:[/] running the modelling code shipped with {path}")
