"""Read rows from local files (JSON, JSONL, CSV, Parquet) or a locally cached Hugging Face dataset."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from ftune import resources
from ftune.errors import FtuneError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FtuneError(f"{path}, line {n}: not valid JSON ({exc.msg} at column {exc.colno})",
                                 hint="Each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(row, dict):
                raise FtuneError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        # Many ".json" files are really JSON Lines; accept those too.
        if exc.msg == "Extra data":
            return _read_jsonl(path)
        raise FtuneError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FtuneError(f"{path}: expected a list of JSON objects (or {{\"data\": [...]}})")
    return data


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_hub(name: str, subset: str | None, split: str) -> list[dict]:
    # Offline by design: only what is already in the local Hugging Face cache can be read.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets

        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types; all mean "not available here"
        raise FtuneError(f"dataset '{name}' (split {split}) could not be read from the local Hugging Face cache",
                         [f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"],
                         "Download it where a network is available (datasets.load_dataset), or give a local "
                         ".jsonl/.json/.csv/.parquet file as the source path.") from None
    return [dict(row) for row in ds]


def read_rows(path_spec: str, split: str = "train", subset: str | None = None) -> list[dict[str, Any]]:
    """All rows of one source; files by suffix, anything else as a Hugging Face dataset name."""
    path = Path(resources.resolve_path(path_spec)).expanduser()
    if path.suffix in READERS:
        if not path.is_file():
            raise FtuneError(f"data file {path} does not exist")
        rows = READERS[path.suffix](path)
    elif path.exists():
        raise FtuneError(f"{path}: unsupported data file; use one of {', '.join(LOCAL_SUFFIXES)}")
    else:
        rows = _read_hub(path_spec, subset, split)
    if not rows:
        raise FtuneError(f"{path_spec}: no rows")
    return rows


def fingerprint(path_spec: str) -> str:
    """Identity of a source for the tokenisation cache: path, size and mtime of local files."""
    path = Path(resources.resolve_path(path_spec)).expanduser()
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return path_spec
