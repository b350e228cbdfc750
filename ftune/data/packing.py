"""Pack samples into rows of at most max_len tokens, with no attention across samples.

Each packed row carries position_ids that restart at 0 for every sample. transformers reads such
position ids (with no attention mask) as packed sequences: SDPA/eager get a block-diagonal causal
mask, and flash-attention its variable-length kernel (which transformers runs only for a one-row
batch: with flash-attention 2 a micro-batch's rows are joined into one, data/collate.collate_varlen).
The first token of each sample gets label -100, so no sample is asked to
predict its first token from the previous sample: the packed loss equals the unpacked loss on the
same samples (tests/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ftune.data.tokenize import IGNORE


def _row(samples: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in samples:
        row["input_ids"] += sample["input_ids"]
        row["labels"] += [IGNORE] + sample["labels"][1:]
        row["position_ids"] += list(range(len(sample["input_ids"])))
    return row


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `width` (first-fit, longest first; an
    item longer than width gets a row of its own). Each row lists its indices in order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return [sorted(row) for row in rows]


def pack_group(samples: list[dict], width: int) -> list[dict]:
    """All of `samples` in as few rows of `width` tokens as first-fit finds, each sample whole."""
    groups = first_fit([len(s["input_ids"]) for s in samples], width)
    return [_row([samples[i] for i in group]) for group in groups]


def pack(samples: list[dict], max_len: int) -> list[dict]:
    """Greedy, order-preserving packing (deterministic for a given sample order)."""
    groups: list[list[dict]] = []
    used = 0
    for sample in samples:
        n = len(sample["input_ids"])
        if not groups or used + n > max_len:
            groups.append([])
            used = 0
        groups[-1].append(sample)
        used += n
    return [_row(group) for group in groups]


def pack_stream(samples: Iterable[dict], max_len: int) -> Iterator[dict]:
    """`pack` as a stream: the same rows in the same order, one at a time (the build writes them to
    the cache as they come, never holding the dataset)."""
    group: list[dict] = []
    used = 0
    for sample in samples:
        n = len(sample["input_ids"])
        if group and used + n > max_len:
            yield _row(group)
            group, used = [], 0
        group.append(sample)
        used += n
    if group:
        yield _row(group)
