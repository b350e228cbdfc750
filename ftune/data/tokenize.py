"""Template segments -> input ids and labels (-100 where no loss is taken)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftune.data.templates import Segment

IGNORE = -100


@dataclass
class TokenStats:
    """Counts reported after tokenisation."""

    samples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def _trained(segment: Segment, train_on: str, last_turn: int) -> bool:
    if train_on == "all":
        return True
    if train_on == "last":
        return segment.train and segment.turn == last_turn
    return segment.train


def tokenize_all(segment_lists: list[list[Segment]], tokenizer: Any, max_len: int, train_on: str,
                 drop_empty: bool = True) -> tuple[list[dict | None], TokenStats]:
    """Tokenise every record's segments in one tokenizer call, then cut to max_len.

    A sample left without trained tokens is dropped (counted), or kept as None with
    drop_empty=False so that callers pairing samples stay aligned."""
    flat = [s.text for segs in segment_lists for s in segs]
    ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    stats, out, k = TokenStats(), [], 0
    for segs in segment_lists:
        last_turn = max((s.turn for s in segs), default=-1)
        ids, labels = [], []
        for seg in segs:
            piece = ids_flat[k]
            k += 1
            ids += piece
            labels += piece if _trained(seg, train_on, last_turn) else [IGNORE] * len(piece)
        if len(ids) > max_len:
            stats.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        # Position 0 is never predicted (no token before it), so it cannot be a target.
        if not any(label != IGNORE for label in labels[1:]):
            stats.dropped_no_target += 1
            if not drop_empty:
                out.append(None)
            continue
        out.append({"input_ids": ids, "labels": labels})
        stats.samples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE for label in labels[1:])
    return out, stats
