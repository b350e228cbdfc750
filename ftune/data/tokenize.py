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
    prompt_truncated: int = 0


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


@dataclass
class CorpusStats(TokenStats):
    """Raw-text counts: every token read is in some block (a long document is split, not cut)."""

    documents: int = 0
    tokens_read: int = 0
    split_documents: int = 0


def tokenize_corpus(texts: list[str], tokenizer: Any, max_len: int) -> tuple[list[dict], CorpusStats]:
    """Documents (each ending with EOS) -> blocks of at most max_len tokens, no token lost.

    A document longer than max_len is split into consecutive blocks that overlap by one token, so
    every token after a document's first is predicted exactly once (a block's first token is never
    a target: nothing precedes it). Blocks never span two documents; packing then fills rows with
    them without attention across blocks."""
    eos = tokenizer.eos_token or ""
    ids_all = tokenizer([t + eos for t in texts], add_special_tokens=False)["input_ids"] if texts else []
    stats, out = CorpusStats(), []
    for ids in ids_all:
        stats.documents += 1
        stats.tokens_read += len(ids)
        if len(ids) < 2:
            stats.dropped_no_target += 1
            continue
        starts = range(0, max(len(ids) - 1, 1), max_len - 1)
        stats.split_documents += len(starts) > 1
        for start in starts:
            piece = ids[start:start + max_len]
            out.append({"input_ids": piece, "labels": list(piece)})
            stats.samples += 1
            stats.tokens += len(piece)
            stats.trained_tokens += len(piece) - 1
    return out, stats
