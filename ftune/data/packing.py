"""Pack samples into rows of at most max_len tokens, with no attention across samples.

Each packed row carries position_ids that restart at 0 for every sample. transformers reads such
position ids (with no attention mask) as packed sequences: SDPA/eager get a block-diagonal causal
mask and flash-attention its varlen kernel. The first token of each sample gets label -100, so no
sample is asked to predict its first token from the previous sample: the packed loss equals the
unpacked loss on the same samples (tests/test_packing.py).
"""

from __future__ import annotations

from ftune.data.tokenize import IGNORE


def pack(samples: list[dict], max_len: int) -> list[dict]:
    """Greedy, order-preserving packing (deterministic for a given sample order)."""
    rows: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in samples:
        n = len(sample["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += sample["input_ids"]
        current["labels"] += [IGNORE] + sample["labels"][1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows
