"""dataset config -> tokenised train and held-out samples, cached on disk.

Order of work: read every source, convert rows to canonical records, split off the held-out rows
(per source, seeded, before weighting so a repeated row never lands on both sides), apply mixing
weights, render with the template, tokenise, then pack. Everything from the records on is cached
under a key that hashes all inputs that change the result, so a rerun does not tokenise again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune import resources
from ftune.config.schema import DatasetConfig, SourceConfig
from ftune.data import formats, notes, sources, store, templates
from ftune.data.badrows import FAIL, BadRows
from ftune.data.packing import pack_stream
from ftune.data.templates import RenderOptions
from ftune.data.tokenize import IGNORE, CorpusStats, TokenStats, tokenize_all, tokenize_corpus
from ftune.errors import FtuneError

CACHE_VERSION = "4"  # bump when tokenisation output changes for the same inputs
UNCUT = 2**62  # tokenize_all's max_len when the caller cuts samples itself (from the left)


@dataclass
class DataBundle:
    """What the trainer needs: samples (packed rows when packing is on) and a few prompts to show."""

    train: Sequence[dict]
    eval: Sequence[dict]
    stats: dict[str, Any]
    eval_prompts: list[list[dict]] = field(default_factory=list)


def source_records(src: SourceConfig, rows: list[dict], where: str, bad: BadRows = FAIL,
                   system: str | None = None) -> list[dict]:
    """A source's rows as canonical records, read with its columns, message keys and roles; the
    source's own system prompt beats the dataset's."""
    layout = formats.Layout(dict(src.message_keys), dict(src.roles))
    return formats.to_records(rows, src.format, dict(src.columns), src.system if src.system is not None else system,
                              where, bad, layout)


def read_source(src: SourceConfig, index: int, bad: BadRows = FAIL, system: str | None = None) -> list[dict]:
    rows = sources.read_rows(src.path, src.split, src.subset, bad)
    return source_records(src, rows, f"dataset.sources[{index}] ({src.path})", bad, system)


def weighted(records: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """weight x records: whole repeats, then a seeded sample for the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    out = records * whole
    if frac > 0:
        out += rng.sample(records, round(frac * len(records)))
    return out


def split_records(cfg: DatasetConfig, seed: int, bad: BadRows = FAIL) -> tuple[list[dict], list[dict]]:
    """(train, held-out) canonical records after splitting and mixing; bad rows go to `bad`."""
    rng = random.Random(seed)
    train, held = [], []
    for i, src in enumerate(cfg.sources):
        records = read_source(src, i, bad, cfg.system)
        rng.shuffle(records)
        n_eval = 0 if cfg.eval_path else min(round(cfg.eval_fraction * len(records)), len(records) - 1)
        held += records[:n_eval]
        train += weighted(records[n_eval:], src.weight, rng)
    if cfg.eval_path:
        first = cfg.sources[0]
        rows = sources.read_rows(cfg.eval_path, bad=bad)
        held = source_records(first, rows, f"dataset.eval_path ({cfg.eval_path})", bad, cfg.system)
    rng.shuffle(train)
    if cfg.max_rows:
        train = train[: cfg.max_rows]
    if cfg.placeholders:  # filled in copies: a weighted source repeats one record object
        train = [dict(r, messages=[dict(m) for m in r["messages"]]) if "messages" in r else dict(r) for r in train]
        notes.fill_placeholders(train, dict(cfg.placeholders))
        notes.fill_placeholders(held, dict(cfg.placeholders))
    if not train:
        raise FtuneError("dataset: no training rows left after the held-out split",
                         hint="Lower dataset.eval_fraction or add rows.")
    return train, held[: cfg.eval_max_rows]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((body + str(tokenizer.chat_template) + str(tokenizer.eos_token)).encode()).hexdigest()


def cache_key(cfg: DatasetConfig, stage: str, seed: int, tokenizer: Any) -> str:
    template_file = (Path(str(cfg.template)).expanduser() if str(cfg.template).endswith((".yaml", ".yml"))
                     else resources.templates_dir() / f"{cfg.template}.yaml")
    parts = {
        "version": CACHE_VERSION,
        "dataset": dataclasses.asdict(cfg),
        "stage": stage,
        "seed": seed,
        "template": template_file.read_text() if template_file.is_file() else cfg.template,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "files": [sources.fingerprint(s.path) for s in cfg.sources]
        + ([sources.fingerprint(cfg.eval_path)] if cfg.eval_path else []),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenize_records(records: list[dict], cfg: DatasetConfig, tokenizer: Any, prompts_only: bool = False
                     ) -> tuple[list[dict], TokenStats]:
    """prompts_only: the stage generates the answers, so rows are tokenised as prompts (PPO)."""
    template = templates.load_template(cfg.template)
    if prompts_only:
        return tokenize_prompts(records, template, cfg, tokenizer)
    if records and "chosen" in records[0]:
        return tokenize_pairs(records, template, cfg, tokenizer)
    if records and "completion" in records[0]:
        return tokenize_feedback(records, template, cfg, tokenizer)
    if records and "text" in records[0]:
        return tokenize_corpus([r["text"] for r in records], tokenizer, cfg.max_seq_len)
    opts = RenderOptions.of(cfg)
    segment_lists = [templates.render(r, template, tokenizer, opts) for r in records]
    return tokenize_all(segment_lists, tokenizer, cfg.max_seq_len, cfg.train_on)


def _answer_start(sample: dict) -> int:
    """Index of the first trained token (where the answer starts)."""
    return next(i for i, label in enumerate(sample["labels"]) if i > 0 and label != IGNORE)


def _keep_answers(samples: list[dict], max_len: int) -> list[dict] | None:
    """Samples that share a prompt, cut to max_len by dropping the prompt's oldest tokens (the same
    number from each, so they still share it) and keeping every answer whole; None when the
    answers alone do not fit (with one token of prompt before them)."""
    longest = max(len(s["input_ids"]) for s in samples)
    if longest <= max_len:
        return samples
    cut = longest - max_len
    if any(cut >= _answer_start(s) for s in samples):
        return None
    return [{"input_ids": s["input_ids"][cut:], "labels": s["labels"][cut:]} for s in samples]


def tokenize_pairs(records: list[dict], template: Any, cfg: DatasetConfig, tokenizer: Any) -> tuple[list[dict], TokenStats]:
    """Preference records -> {chosen_*, rejected_*} samples, each side masked like SFT (the final
    answer is the target). A pair is dropped when either side loses its answer to truncation."""
    sides, opts = {}, RenderOptions.of(cfg)
    for side in ("chosen", "rejected"):
        convs = [{"messages": [*r["messages"], {"role": "assistant", "content": r[side]}]} for r in records]
        segs = [templates.render(c, template, tokenizer, opts) for c in convs]
        sides[side], _ = tokenize_all(segs, tokenizer, UNCUT, "last", drop_empty=False)
    stats, pairs = TokenStats(), []
    for c, r in zip(sides["chosen"], sides["rejected"]):
        kept = _keep_answers([c, r], cfg.max_seq_len) if c is not None and r is not None else None
        if kept is None:
            stats.dropped_no_target += 1
            continue
        if kept[0] is not c:
            stats.prompt_truncated += 1
        c, r = kept
        pairs.append({"chosen": c, "rejected": r})
        stats.samples += 1
        stats.tokens += len(c["input_ids"]) + len(r["input_ids"])
        stats.trained_tokens += sum(x != -100 for x in c["labels"][1:]) + sum(x != -100 for x in r["labels"][1:])
    return pairs, stats


def tokenize_feedback(records: list[dict], template: Any, cfg: DatasetConfig, tokenizer: Any
                      ) -> tuple[list[dict], TokenStats]:
    """Unpaired feedback (KTO) -> samples masked like SFT, each with a `label` (desirable or not)
    and a mismatched row for KTO's KL estimate: this prompt with the next sample's answer (a fixed
    pairing, so the reference log-probs of these rows can be computed once)."""
    convs = [{"messages": [*r["messages"], {"role": "assistant", "content": r["completion"]}]} for r in records]
    opts = RenderOptions.of(cfg)
    samples, _ = tokenize_all([templates.render(c, template, tokenizer, opts) for c in convs], tokenizer,
                              UNCUT, "last", drop_empty=False)
    kept, stats = [], TokenStats()
    for sample, record in zip(samples, records):
        cut = _keep_answers([sample], cfg.max_seq_len) if sample is not None else None
        if cut is None:
            stats.dropped_no_target += 1
            continue
        stats.prompt_truncated += cut[0] is not sample
        stats.samples += 1
        stats.tokens += len(cut[0]["input_ids"])
        stats.trained_tokens += sum(x != IGNORE for x in cut[0]["labels"][1:])
        kept.append((cut[0], record["label"]))

    out = []
    for i, (sample, label) in enumerate(kept):
        other = kept[(i + 1) % len(kept)][0]
        p, a = _answer_start(sample), _answer_start(other)
        kl_ids = sample["input_ids"][:p] + other["input_ids"][a:]
        kl_labels = [-100] * p + other["labels"][a:]
        out.append({**sample, "label": bool(label), "kl": {"input_ids": kl_ids[:cfg.max_seq_len + 64],
                                                           "labels": kl_labels[:cfg.max_seq_len + 64]}})
    return out, stats


def prompt_of(record: dict) -> tuple[list[dict], str | None]:
    """(messages ending with a user turn, reference answer or None) for any record with messages:
    an SFT record's final answer and a preference record's chosen answer become the reference."""
    messages, reference = record["messages"], record.get("reference") or record.get("chosen")
    if messages[-1]["role"] == "assistant":
        messages, reference = messages[:-1], reference or messages[-1]["content"]
    return messages, reference


def tokenize_prompts(records: list[dict], template: Any, cfg: DatasetConfig, tokenizer: Any
                     ) -> tuple[list[dict], TokenStats]:
    """PPO prompts: the rendered prompt up to the assistant's turn, its messages and reference.
    A prompt longer than max_seq_len is dropped (counted): cutting it would change the question."""
    stats, out, opts = TokenStats(), [], RenderOptions.of(cfg)
    for record in records:
        messages, reference = prompt_of(record)
        ids = tokenizer(templates.render_prompt(messages, template, tokenizer, opts), add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_seq_len:
            stats.truncated += 1
            continue
        out.append({"prompt_ids": ids, "messages": messages, "reference": reference})
        stats.samples += 1
        stats.tokens += len(ids)
    return out, stats


def data_notes(records: list[dict], cfg: DatasetConfig, tokenizer: Any) -> list[str]:
    """What the rendered data holds that the config does not say (see ftune/data/notes.py)."""
    found = [notes.system_note(records, templates.load_template(cfg.template), tokenizer, cfg.system),
             notes.placeholder_note(records)]
    return [n for n in found if n]


SPLITS = ("train", "eval")
CHUNK = 5000  # records rendered and tokenised together (one process's job)
CHUNK_CHARS = 20_000_000  # at most this much raw text per chunk
_JOB: tuple = ()  # (records, cfg, tokenizer, prompts_only), set before worker processes fork


def _chunk_job(span: tuple[int, int]) -> tuple[list[dict], dict]:
    records, cfg, tokenizer, prompts_only = _JOB
    samples, stats = tokenize_records(records[span[0]:span[1]], cfg, tokenizer, prompts_only)
    return samples, dataclasses.asdict(stats)


def _processes(cfg: DatasetConfig) -> int:
    return cfg.num_proc if cfg.num_proc > 0 else (os.cpu_count() or 1)


def tokenized(records: list[dict], cfg: DatasetConfig, tokenizer: Any, prompts_only: bool, stats: dict
              ) -> Iterator[dict]:
    """Every record's sample, in order, chunk by chunk; `stats` accumulates the counts. With
    dataset.num_proc > 1 the chunks are tokenised by worker processes (forked: they read the
    records and tokenizer without copying them). Unpaired feedback is one chunk: each of its rows
    borrows the next row's answer (tokenize_feedback)."""
    global _JOB
    spans = _spans(records)
    procs = min(_processes(cfg), len(spans))
    if procs > 1:
        _JOB = (records, cfg, tokenizer, prompts_only)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each process tokenises on its own core
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for samples, counts in pool.imap(_chunk_job, spans):
                _add(stats, counts)
                yield from samples
        _JOB = ()
        return
    for a, b in spans:
        samples, counts = tokenize_records(records[a:b], cfg, tokenizer, prompts_only)
        _add(stats, dataclasses.asdict(counts))
        yield from samples


def _spans(records: list[dict]) -> list[tuple[int, int]]:
    """[start, end) of each chunk: CHUNK records, fewer when raw text passes CHUNK_CHARS (long
    documents), all of them for unpaired feedback."""
    if records and "completion" in records[0]:
        return [(0, len(records))]
    spans, start, chars = [], 0, 0
    for i, record in enumerate(records):
        chars += len(record.get("text", ""))
        if i + 1 - start >= CHUNK or chars >= CHUNK_CHARS:
            spans.append((start, i + 1))
            start, chars = i + 1, 0
    if start < len(records):
        spans.append((start, len(records)))
    return spans


def _add(total: dict, counts: dict) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def _empty_stats(records: list[dict]) -> dict:
    kind = CorpusStats if records and "text" in records[0] else TokenStats
    return dataclasses.asdict(kind())


def build(cfg: DatasetConfig, stage: str, seed: int, tokenizer: Any, use_cache: bool = True,
          prompts_only: bool = False) -> DataBundle:
    """Tokenised samples for training and evaluation (from the cache when nothing changed); `stage`
    names the stage in the cache key, prompts_only is its schema's fact (see tokenize_records).

    Samples stream from the tokeniser (and packer) into the cache's Arrow files and are read back
    memory-mapped; with use_cache=False they are kept as lists instead."""
    key = cache_key(cfg, stage, seed, tokenizer)
    folder = resources.cache_dir() / "data" / f"{cfg.name}-{key}"
    if use_cache and store.is_complete(folder, SPLITS):
        rows, meta = store.load(folder, SPLITS)
        meta["stats"]["from_cache"] = str(folder)
        return DataBundle(train=rows["train"], eval=rows["eval"], stats=meta["stats"], eval_prompts=meta["eval_prompts"])
    if cfg.packing and not tokenizer.eos_token:
        raise FtuneError("dataset.packing=true, but the tokenizer has no EOS token",
                         ["packed samples are told apart by the EOS token that ends each one; without it the "
                          "model never learns where a sample stops"],
                         "Set dataset.packing=false, or use a tokenizer with an eos_token (tokenizer_config.json).")
    bad = BadRows(skip=cfg.on_bad_row == "skip")
    train_records, eval_records = split_records(cfg, seed, bad)
    train_stats, eval_stats = _empty_stats(train_records), _empty_stats(eval_records)
    splits = {"train": tokenized(train_records, cfg, tokenizer, prompts_only, train_stats),
              "eval": tokenized(eval_records, cfg, tokenizer, prompts_only, eval_stats)}
    if cfg.packing:
        splits = {name: pack_stream(samples, cfg.max_seq_len) for name, samples in splits.items()}
    prompts = [prompt_of(r)[0] for r in eval_records[:4] if "messages" in r]
    said = data_notes(train_records, cfg, tokenizer)

    def meta(counts: dict[str, int]) -> dict:
        if not train_stats["samples"]:
            raise FtuneError("dataset: every training sample was dropped (no trained tokens left)",
                             [f"{train_stats['dropped_no_target']} samples had no assistant tokens within "
                              f"max_seq_len={cfg.max_seq_len}"],
                             "Raise dataset.max_seq_len or check the template and train_on setting.")
        stats = {"train": train_stats, "eval": eval_stats, "cache": str(folder), "bad_rows": bad.summary(), "notes": said}
        if cfg.packing:
            stats["packed_rows"] = counts
        return {"stats": stats, "eval_prompts": prompts}

    if not use_cache:
        lists = {name: list(samples) for name, samples in splits.items()}
        info = meta({name: len(rows) for name, rows in lists.items()})
        return DataBundle(train=lists["train"], eval=lists["eval"], stats=info["stats"], eval_prompts=prompts)
    store.save(folder, splits, meta)
    rows, info = store.load(folder, SPLITS)
    return DataBundle(train=rows["train"], eval=rows["eval"], stats=info["stats"], eval_prompts=prompts)
