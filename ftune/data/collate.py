"""Samples -> padded tensors for one micro-batch."""

from __future__ import annotations

import torch

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
