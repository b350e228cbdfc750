"""Generated documentation stays in step with the code it is generated from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_key_table_is_the_schemas():
    keys = _script("config_keys")
    assert (ROOT / "docs" / "config_keys.md").read_text() == keys.render(), \
        "docs/config_keys.md is out of date: run .venv/bin/python scripts/config_keys.py"


def test_the_key_table_reads_every_field_docstring():
    """A field without a docstring shows as an empty meaning: there must be none."""
    keys = _script("config_keys")
    empty = [line.split("|")[1].strip() for line in keys.render().splitlines()
             if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not empty, empty
