"""Reading a user's YAML file: bad YAML or a file that is not a mapping is an FtuneError naming
the file and line, never a parser traceback."""

from __future__ import annotations

from pathlib import Path

import yaml

from ftune.errors import FtuneError


def read_mapping(path: Path, what: str) -> dict:
    """The YAML mapping in `path` ({} for an empty file); `what` names it in errors ("a recipe")."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise FtuneError(f"{path}: not UTF-8 text (byte {exc.start})", hint="Save the file as UTF-8.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise FtuneError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})",
                         hint="Check the indentation and quoting near that line.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FtuneError(f"{path}: expected {what} (a YAML mapping of key: value), got a {type(data).__name__}")
    return data
