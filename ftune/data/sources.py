"""Read rows from local files (JSON, JSONL, CSV, Parquet) or a locally cached Hugging Face dataset."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftune import resources
from ftune.data.badrows import FAIL, BadRows
from ftune.errors import FtuneError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
GLOB_CHARS = set("*?[")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line, read as the caller goes: a large file is never
    held twice (as bytes and as parsed rows)."""
    with path.open("rb") as f:
        yield from ((n, line) for n, line in enumerate(f, 1) if line.strip())


def _read_jsonl(path: Path, bad: BadRows = FAIL) -> list[dict]:
    """One JSON object a line; a line that is not UTF-8, not JSON or not an object is a bad row."""
    rows = []
    for n, raw in _lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.found(f"{path}, line {n}: not valid UTF-8 (byte {exc.start} of the line: {raw[exc.start:exc.start + 1]!r})",
                      hint="Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.found(f"{path}, line {n}: not valid JSON ({exc.msg}, column {exc.colno})",
                      hint="Each line of a .jsonl file must be one JSON object.")
            continue
        if not isinstance(row, dict):
            bad.found(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}",
                      hint="Each line of a .jsonl file must be one JSON object ({...}).")
            continue
        rows.append(row)
    return rows


def _text(path: Path) -> str:
    """The whole file as UTF-8; an invalid byte is named by line (a file-level problem: not skippable)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FtuneError(f"{path}, line {line}: not valid UTF-8 (byte {data[exc.start:exc.start + 1]!r})",
                         hint="Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def _read_json(path: Path, bad: BadRows = FAIL) -> list[dict]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        # Many ".json" files are really JSON Lines; accept those too.
        if exc.msg == "Extra data":
            return _read_jsonl(path, bad)
        raise FtuneError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise FtuneError(f"{path}: expected a list of JSON objects (or {{\"data\": [...]}}), got {type(data).__name__}")
    rows = []
    for i, row in enumerate(data, 1):
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.found(f"{path}, item {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_csv(path: Path, bad: BadRows = FAIL) -> list[dict]:

    return [dict(row) for row in csv.DictReader(io.StringIO(_text(path), newline=""))]


def _read_parquet(path: Path, bad: BadRows = FAIL) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's many error types all mean "not a readable parquet file"
        raise FtuneError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_txt(path: Path, bad: BadRows = FAIL) -> list[dict]:
    """A plain-text file is one document (format=text); long ones are split into blocks, not cut."""
    text = _text(path)
    return [{"text": text}] if text.strip() else []


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def files_of(path_spec: str) -> list[Path] | None:
    """The files a directory (searched recursively) or a glob (`**` for any depth) stands for, in
    sorted order; None when path_spec is neither."""
    text = str(resources.resolve_path(path_spec))
    path = Path(text).expanduser()
    if GLOB_CHARS & set(text):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*"))
    else:
        return None
    return [p for p in found if p.is_file() and p.suffix in READERS]


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


def read_rows(path_spec: str, split: str = "train", subset: str | None = None, bad: BadRows = FAIL
              ) -> list[dict[str, Any]]:
    """All rows of one source; files by suffix (a directory or glob: every file in it with a known
    suffix, in sorted order), anything else as a Hugging Face dataset name."""
    path = Path(resources.resolve_path(path_spec)).expanduser()
    files = files_of(path_spec)
    if files is not None:
        if not files:
            raise FtuneError(f"{path_spec}: no files match (looked for {', '.join(LOCAL_SUFFIXES)} files)",
                             hint="Check the folder or pattern; `**` matches any depth, e.g. corpus/**/*.txt.")
        rows = [row for f in files for row in READERS[f.suffix](f, bad)]
    elif path.suffix in READERS:
        if not path.is_file():
            raise FtuneError(f"data file {path} does not exist")
        rows = READERS[path.suffix](path, bad)
    elif path.exists():
        raise FtuneError(f"{path}: unsupported data file; use one of {', '.join(LOCAL_SUFFIXES)}")
    else:
        rows = _read_hub(path_spec, subset, split)
    if not rows:
        raise FtuneError(f"{path_spec}: no rows" + (f" ({bad.count} bad rows skipped)" if bad.count else ""),
                         hint="Give a file with at least one row in the source's format.")
    return rows


def fingerprint(path_spec: str) -> str:
    """Identity of a source for the tokenisation cache: path, size and mtime of local files."""
    path = Path(resources.resolve_path(path_spec)).expanduser()
    files = files_of(path_spec) if not path.is_file() else [path]
    if files:
        return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return path_spec
