"""Samples -> tensors for one micro-batch: right-padded rows, or padding-free shared rows."""

from __future__ import annotations

import torch

from ftune.data.packing import first_fit, pack, pack_group
from ftune.data.tokenize import IGNORE


def collate(samples: list[dict], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample (rounded up to a multiple of 8 for friendlier kernels).

    Packed rows (with position_ids) get no attention mask: the restarting position ids tell the
    model where samples begin, and the padding tail becomes one more masked-out "sample".
    """
    longest = max(len(s["input_ids"]) for s in samples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    packed = "position_ids" in samples[0]
    batch = {"input_ids": [], "labels": [], ("position_ids" if packed else "attention_mask"): []}
    for s in samples:
        pad = width - len(s["input_ids"])
        batch["input_ids"].append(s["input_ids"] + [pad_id] * pad)
        batch["labels"].append(s["labels"] + [IGNORE] * pad)
        if packed:
            batch["position_ids"].append(s["position_ids"] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(s["input_ids"]) + [0] * pad)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    out["num_tokens"] = torch.tensor(sum(len(s["input_ids"]) for s in samples))
    return out


def collate_padding_free(samples: list[dict], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """The micro-batch's samples packed into shared rows (first-fit, longest first; width from
    row_width), then collated as packed rows. Unpacked, a micro-batch of samples of mixed
    lengths is mostly padding (a quarter of the positions on the default data); packed this way
    only the tails of the last rows are. Already packed rows are collated as they are."""
    if "position_ids" in samples[0]:
        return collate(samples, pad_id, pad_to_multiple)
    width = row_width([len(s["input_ids"]) for s in samples], pad_to_multiple)
    return collate(pack_group(samples, width), pad_id, pad_to_multiple)


def collate_varlen(samples: list[dict], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """The whole micro-batch as ONE row of sample after sample (packed rows joined end to end,
    or unpacked samples packed whole), position ids restarting per sample, no attention mask.

    For flash-attention 2: transformers runs its variable-length kernel (each sample attends only
    to itself, no padding computed) from restarting position ids only when the batch has a single
    row; with several rows it would run plain causal attention over each row, across the samples
    packed into it. One row costs nothing here: the kernel's work is per sample."""
    rows = samples if "position_ids" in samples[0] else pack(samples, sum(len(s["input_ids"]) for s in samples))
    joined = {key: [v for row in rows for v in row[key]] for key in ("input_ids", "labels", "position_ids")}
    return collate([joined], pad_id, pad_to_multiple)


ATTENTION_WIDTH = 2048
"""Row width at which a row's attention (computed over the full square) costs about as much as
its linear layers, for a 135M Llama (larger models: wider); it prices wider rows."""


def row_width(lengths: list[int], multiple: int = 8) -> int:
    """The row width for padding-free rows: from the longest sample up to twice it, the width
    whose first-fit rows cost least, counting positions x (1 + width / ATTENTION_WIDTH)."""
    longest = -(-max(lengths) // multiple) * multiple

    def cost(width: int) -> float:
        rows = len(first_fit(lengths, width))
        return rows * width * (1 + width / ATTENTION_WIDTH)

    return min(range(longest, 2 * longest + 1, multiple), key=cost)
