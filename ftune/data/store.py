"""The tokenised-data cache: samples in Arrow IPC files, read back memory-mapped.

A split is written batch by batch while it is built (never one whole-dataset object in memory),
and read through `Rows`, a sequence whose items are decoded on access from a memory-mapped file:
a dataset far larger than RAM trains, and processes on one machine share the same pages. Arrow
holds only data (no pickle), so a cache folder cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

BATCH = 2048  # samples per record batch written


class Rows(Sequence):
    """The samples of one split in an Arrow file, decoded on access (a list of dicts to the trainer)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._table: pa.Table | None = None

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            with pa.memory_map(str(self.path), "r") as source:
                self._table = pa.ipc.open_file(source).read_all()
        return self._table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.table.slice(*_span(index, len(self))).to_pylist()
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.table.slice(index, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches():
            yield from batch.to_pylist()

    def __getstate__(self) -> dict:  # a path travels between processes, not the mapped table
        return {"path": self.path, "_table": None}


def _span(index: slice, n: int) -> tuple[int, int]:
    start, stop, step = index.indices(n)
    if step != 1:
        raise IndexError("Rows slices take step 1")
    return start, max(stop - start, 0)


def _narrow_type(t: pa.DataType) -> pa.DataType:
    """Token ids and labels fit in int32: half the bytes of the int64 Arrow infers."""
    if pa.types.is_int64(t):
        return pa.int32()
    if pa.types.is_list(t):
        return pa.list_(_narrow_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _narrow_type(f.type)) for f in t])
    return t


def _narrow(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, _narrow_type(f.type)) for f in schema])


def write_split(path: Path, samples: Iterable[dict]) -> int:
    """Write samples to an Arrow IPC file in batches; returns how many. The schema is the first
    batch's (every sample of a split has the same layout)."""
    writer, schema, count, batch = None, None, 0, []

    def flush() -> None:
        nonlocal writer, schema
        if schema is None:
            schema = _narrow(pa.Table.from_pylist(batch).schema)
            writer = pa.ipc.new_file(str(path), schema)
        table = pa.Table.from_pylist(batch, schema=schema)
        writer.write_table(table)

    for sample in samples:
        batch.append(sample)
        count += 1
        if len(batch) == BATCH:
            flush()
            batch = []
    if batch:
        flush()
    if writer is None:  # an empty split: a file with no columns and no rows
        writer = pa.ipc.new_file(str(path), pa.schema([]))
    writer.close()
    return count


def save(folder: Path, splits: dict[str, Iterable[dict]], meta: Callable[[dict[str, int]], dict]) -> dict[str, int]:
    """Write a cache entry atomically: into a temporary folder, renamed into place when complete,
    so an interrupted build leaves no half-written entry. `meta(counts)` gives the entry's
    meta.json once every split is written (and may refuse the entry by raising)."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {name: write_split(tmp / f"{name}.arrow", samples) for name, samples in splits.items()}
        (tmp / "meta.json").write_text(json.dumps(meta(counts)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return counts


def load(folder: Path, names: Iterable[str]) -> tuple[dict[str, Rows], dict]:
    meta = json.loads((folder / "meta.json").read_text())
    return {name: Rows(folder / f"{name}.arrow") for name in names}, meta


def is_complete(folder: Path, names: Iterable[str]) -> bool:
    return (folder / "meta.json").is_file() and all((folder / f"{n}.arrow").is_file() for n in names)
